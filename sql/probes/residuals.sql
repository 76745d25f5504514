-- residuals: pooled residual-stream vectors of some datasets at one layer (the dense baseline's design).
--
-- Inputs : view `residuals` (layer, dataset, sample_id, resid_mean, resid_max).
-- Params : $layer integer, $datasets varchar[].
-- Output : one row per sample with its mean- and max-pooled residual vectors (as variable-size lists).
-- Grain  : dataset x sample_id.

with

final as (
    select
        dataset,
        sample_id,
        cast(resid_mean as float[]) as resid_mean,
        cast(resid_max as float[]) as resid_max
    from residuals
    where layer = $layer
        and list_contains($datasets::varchar[], dataset)
)

select * from final
