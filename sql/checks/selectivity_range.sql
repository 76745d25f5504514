-- selectivity_range: asset check on feature_stats; selectivities outside [-1, 1] at one layer.
--
-- Inputs : view `feature_stats` (output of stats/feature_stats.sql).
-- Params : $layer integer
-- Output : the violating features (selectivity or selectivity_mean_act out of range, which happens only
--          with negative activations, i.e. bad input); no rows means the check passes.
-- Grain  : layer x feature_id.

with

layer_stats as (
    select
        layer,
        feature_id,
        selectivity,
        selectivity_mean_act,
        pos_mean,
        neg_mean
    from feature_stats
    where layer = $layer
),

final as (
    select *
    from layer_stats
    where not (selectivity between -1 and 1)
        or not (selectivity_mean_act between -1 and 1)
)

select * from final
order by feature_id
