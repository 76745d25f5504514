-- feature_windows: the top windows of some features: the samples where each fires hardest, with the
-- tokens around its peak and the feature's activation on each of them.
--
-- Uses   : views/feature_token_activations, views/tokens_around
-- Inputs : views `activations` (argmax_token), `tokens` (token_text), `token_activations` (act),
--          `samples` (label, is_positive, role).
-- Params : $layer integer, $feature_ids integer[], $top_k integer (windows per feature),
--          $window integer (tokens each side of the peak).
-- Output : one row per token of each window: rank (1 = strongest sample), the sample, its length in
--          tokens, its peak (argmax_token, max_act), token_pos, token_text and act (0 where the feature
--          was silent).
-- Grain  : feature_id x rank x token_pos.

with

ranked as (
    select
        feature_id,
        dataset,
        sample_id,
        max_act,
        argmax_token,
        row_number() over (partition by feature_id order by max_act desc, dataset, sample_id) as rank
    from activations
    where layer = $layer
        and list_contains($feature_ids::integer[], feature_id)
        and max_act > 0
    qualify rank <= $top_k
),

sample_lengths as (
    select
        tokens.dataset,
        tokens.sample_id,
        max(tokens.token_pos) + 1 as n_tokens
    from tokens
    semi join ranked
        using (dataset, sample_id)
    group by tokens.dataset, tokens.sample_id
),

window_tokens as (
    select *
    from tokens_around('ranked', 'argmax_token', $window)
),

token_acts as (
    select *
    from feature_token_activations($layer, $feature_ids)
),

final as (
    select
        window_tokens.feature_id,
        window_tokens.rank,
        window_tokens.dataset,
        window_tokens.sample_id,
        samples.role,
        samples.label,
        samples.is_positive,
        sample_lengths.n_tokens,
        window_tokens.max_act,
        window_tokens.argmax_token,
        window_tokens.token_pos,
        window_tokens.token_text,
        coalesce(token_acts.act, 0) as act
    from window_tokens
    left join token_acts
        using (dataset, sample_id, token_pos, feature_id)
    left join samples
        on window_tokens.dataset = samples.dataset
        and window_tokens.sample_id = samples.sample_id
    left join sample_lengths
        on window_tokens.dataset = sample_lengths.dataset
        and window_tokens.sample_id = sample_lengths.sample_id
)

select * from final
order by feature_id, rank, token_pos
