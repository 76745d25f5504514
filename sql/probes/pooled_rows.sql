-- pooled_rows: the sparse pooled SAE activations of some datasets at one layer (the probe designs).
--
-- Inputs : view `activations` (layer, dataset, sample_id, feature_id, max_act, mean_act).
-- Params : $layer integer, $datasets varchar[] (the datasets to read).
-- Output : one row per active (sample, feature); inactive features have no row (a zero in the design).
-- Grain  : dataset x sample_id x feature_id.

with

final as (
    select dataset, sample_id, feature_id, max_act, mean_act
    from activations
    where layer = $layer
        and list_contains($datasets::varchar[], dataset)
)

select * from final
