-- feature_stats_nan: asset check on feature_stats; every NaN or infinite statistic of one layer.
--
-- Inputs : view `feature_stats` (output of stats/feature_stats.sql).
-- Params : $layer integer
-- Output : the violating values, one row per (feature, statistic); no rows means the check passes.
--          NULLs are not violations here (a NULL selectivity means a class is missing: see train_classes).
-- Grain  : layer x feature_id x stat.

with

layer_stats as (
    select
        layer,
        feature_id,
        cast(pos_mean as double) as pos_mean,
        cast(neg_mean as double) as neg_mean,
        cast(pos_freq as double) as pos_freq,
        cast(neg_freq as double) as neg_freq,
        cast(max_act as double) as max_act,
        cast(selectivity as double) as selectivity,
        cast(pos_mean_mean_act as double) as pos_mean_mean_act,
        cast(neg_mean_mean_act as double) as neg_mean_mean_act,
        cast(selectivity_mean_act as double) as selectivity_mean_act
    from feature_stats
    where layer = $layer
),

long as (
    from layer_stats
    unpivot (
        value for stat in (
            pos_mean, neg_mean, pos_freq, neg_freq, max_act, selectivity,
            pos_mean_mean_act, neg_mean_mean_act, selectivity_mean_act
        )
    )
),

final as (
    select
        layer,
        feature_id,
        stat,
        value
    from long
    where isnan(value) or isinf(value)
)

select * from final
order by feature_id, stat
