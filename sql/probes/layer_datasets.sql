-- layer_datasets: which datasets have pooled activations at a layer.
--
-- Uses   : views/layer_datasets
-- Inputs : view `activations` (layer, dataset).
-- Params : $layer integer.
-- Output : one row per dataset extracted at $layer.
-- Grain  : dataset.

with

final as (
    select dataset
    from layer_datasets($layer)
)

select * from final
order by dataset
