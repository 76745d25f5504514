-- feature_classifications: relevance of some features of a layer (score 0-10, category, themes).
--
-- Inputs : view `classifications` (layer, feature_id, score, category, themes, status).
-- Params : $layer integer, $feature_ids integer[].
-- Output : one row per feature with a successful classification; themes as text.
-- Grain  : feature_id.

with

final as (
    select
        feature_id,
        any_value(score order by score desc) as score,
        any_value(category order by score desc) as category,
        any_value(cast(themes as varchar) order by score desc) as themes
    from classifications
    where layer = $layer
        and list_contains($feature_ids::integer[], feature_id)
        and status = 'ok'
    group by feature_id
)

select * from final
order by feature_id
