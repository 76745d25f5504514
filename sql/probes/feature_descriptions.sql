-- feature_descriptions: the LLM descriptions of some features of a layer, for the report.
--
-- Inputs : view `descriptions` (layer, feature_id, description, status).
-- Params : $layer integer, $feature_ids integer[].
-- Output : one row per described feature (status 'ok' with a description).
-- Grain  : feature_id.

with

final as (
    select
        feature_id,
        any_value(description order by description) as description
    from descriptions
    where layer = $layer
        and list_contains($feature_ids::integer[], feature_id)
        and status = 'ok'
        and description is not null
    group by feature_id
)

select * from final
order by feature_id
