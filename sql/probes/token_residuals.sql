-- token_residuals: every real token's residual vector at one layer, the design of token-level dense probes.
--
-- Inputs : view `token_residuals` (layer, dataset, sample_id, token_pos, resid FLOAT[]: the catalog's view
--          applies the stored power-of-two scale).
-- Params : $layer     integer    the layer
--          $datasets  varchar[]  datasets to read
-- Output : one row per (dataset, sample, token), in token order within each sample.
-- Grain  : dataset x sample_id x token_pos.

with

final as (
    select dataset, sample_id, token_pos, resid
    from token_residuals
    where layer = $layer
        and list_contains($datasets::varchar[], dataset)
)

select * from final
order by dataset, sample_id, token_pos
