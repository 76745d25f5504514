-- describe/features: the selected features of one layer that the describe assets work on.
--
-- Inputs : view `selected_features` (layer, feature_id, rank, direction, selectivity; written by the
--          `selected_features` asset to stats/selected_features/layer=L).
-- Params : $layer        integer           the layer
--          $max_features integer or NULL   the first N by selection rank; NULL keeps them all
-- Output : one row per feature: feature_id, feature_rank (1 = most selective), direction, selectivity.
-- Grain  : feature_id.

with

ranked as (
    select
        feature_id,
        rank,
        direction,
        selectivity,
        row_number() over (order by rank, feature_id) as position
    from selected_features
    where layer = $layer
),

final as (
    select
        cast(feature_id as integer) as feature_id,
        cast(rank as integer) as feature_rank,
        direction,
        cast(selectivity as double) as selectivity
    from ranked
    where $max_features is null or position <= $max_features
)

select * from final
order by feature_rank, feature_id
