-- describe/window_tokens: the tokens of each describe window and the feature's activation on each.
--
-- Inputs : view `describe_windows` (the output of describe/windows.sql; the caller registers it under
--          this name), views `tokens` (token_text) and `token_activations` (act).
-- Uses   : views/tokens_around
-- Params : $layer  integer  the layer
--          $window integer  tokens each side of a window's center
-- Output : one row per token of each window (token_pos in center - $window .. center + $window, clipped
--          to the sample): feature_id, part, part_rank, dataset, sample_id, token_pos, token_text and act,
--          the feature's activation on the token (0 where it was silent: token_activations is sparse).
-- Grain  : feature_id x part x part_rank x token_pos.

with

windows as (
    select
        feature_id,
        part,
        part_rank,
        dataset,
        sample_id,
        center
    from describe_windows
),

window_tokens as (
    select *
    from tokens_around('windows', 'center', $window)
),

window_samples as (
    select distinct
        feature_id,
        dataset,
        sample_id
    from windows
),

token_acts as (
    select
        token_activations.dataset,
        token_activations.sample_id,
        token_activations.token_pos,
        token_activations.feature_id,
        token_activations.act
    from token_activations
    semi join window_samples
        using (feature_id, dataset, sample_id)
    where token_activations.layer = $layer
        and token_activations.feature_id in (select feature_id from window_samples)
),

final as (
    select
        window_tokens.feature_id,
        window_tokens.part,
        window_tokens.part_rank,
        window_tokens.dataset,
        window_tokens.sample_id,
        window_tokens.token_pos,
        window_tokens.token_text,
        cast(coalesce(token_acts.act, 0) as double) as act
    from window_tokens
    left join token_acts
        using (dataset, sample_id, token_pos, feature_id)
)

select * from final
order by feature_id, part, part_rank, token_pos
