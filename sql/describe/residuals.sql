-- describe/residuals: the pooled residual mean of every sample of a layer, for near-miss negatives.
--
-- Inputs : view `residuals` (layer, dataset, sample_id, resid_mean; written by the activations asset).
-- Params : $layer  integer  the layer
-- Output : one row per sample: dataset, sample_id, resid (float[]: the residual stream averaged over the
--          sample's tokens). windows.sql ranks candidate negatives by its cosine to the anchor's.
-- Grain  : dataset x sample_id.

with

final as (
    select
        cast(dataset as varchar) as dataset,
        cast(sample_id as integer) as sample_id,
        cast(resid_mean as float[]) as resid
    from residuals
    where layer = $layer
)

select * from final
