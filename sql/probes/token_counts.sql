-- token_counts: how many real tokens (BOS dropped, after truncation) each sample has, so token-level
-- probes score every token, also the ones where no chosen feature fires.
--
-- Inputs : view `tokens` (dataset, sample_id, token_pos).
-- Params : $datasets  varchar[]  datasets to count
-- Output : one row per (dataset, sample) with n_tokens = max(token_pos) + 1.
-- Grain  : dataset x sample_id.

with

final as (
    select
        dataset,
        sample_id,
        max(token_pos) + 1 as n_tokens
    from tokens
    where list_contains($datasets::varchar[], dataset)
    group by dataset, sample_id
)

select * from final
