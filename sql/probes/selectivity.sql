-- selectivity: the training selectivity of every active feature of a layer (ranks the top-N sets).
--
-- Inputs : view `feature_stats` (layer, feature_id, selectivity, is_active).
-- Params : $layer integer.
-- Output : features marked is_active with a defined selectivity.
-- Grain  : feature_id.

with

final as (
    select
        feature_id,
        selectivity
    from feature_stats
    where layer = $layer
        and is_active
        and selectivity is not null
)

select * from final
order by feature_id
