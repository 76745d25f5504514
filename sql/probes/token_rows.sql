-- token_rows: per-token SAE activations of chosen features, the design of token-level SAE probes.
--
-- Uses   : views/feature_token_activations
-- Inputs : view `token_activations` (layer, dataset, sample_id, token_pos, feature_id, act).
-- Params : $layer        integer    the layer
--          $datasets     varchar[]  datasets to read
--          $feature_ids  integer[]  features the probes use (a token with none of them active has no row)
-- Output : one row per (dataset, sample, token, feature) with act > 0.
-- Grain  : dataset x sample_id x token_pos x feature_id.

with

final as (
    select *
    from feature_token_activations($layer, $feature_ids)
    where list_contains($datasets::varchar[], dataset)
        and act > 0
)

select * from final
