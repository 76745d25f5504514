-- layer_datasets: which datasets have pooled activations at a layer.
--
-- Inputs : view `activations` (layer, dataset).
-- Params : $layer integer.
-- Output : one row per dataset extracted at $layer.
-- Grain  : dataset.

with

final as (
    select distinct dataset
    from activations
    where layer = $layer
)

select * from final
order by dataset
