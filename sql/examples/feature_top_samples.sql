-- feature_top_samples: where does feature $feature_id fire hardest, and on which token?
--
-- Inputs : views `activations`, `samples`, `tokens`.
-- Params : $layer integer, $feature_id integer, $limit integer (how many samples, e.g. 20)
-- Output : the samples with the highest max_act of the feature over every dataset, with the token at
--          the peak (tokens.token_pos = activations.argmax_token) and a context window of the text
--          around it, the peak token marked [[like this]].
-- Grain  : dataset x sample_id.

with

top_activations as (
    select
        dataset,
        sample_id,
        max_act,
        mean_act,
        argmax_token,
        n_active_tokens
    from activations
    where layer = $layer
        and feature_id = $feature_id
    order by max_act desc, dataset, sample_id
    limit $limit
),

with_tokens as (
    select
        top_activations.*,
        samples.label,
        samples.is_positive,
        samples.role,
        samples.text,
        tokens.token_text as peak_token,
        tokens.char_start,
        tokens.char_end
    from top_activations
    inner join samples
        using (dataset, sample_id)
    left join tokens
        on top_activations.dataset = tokens.dataset
        and top_activations.sample_id = tokens.sample_id
        and top_activations.argmax_token = tokens.token_pos
),

final as (
    select
        dataset,
        sample_id,
        role,
        label,
        is_positive,
        max_act,
        mean_act,
        n_active_tokens,
        argmax_token,
        peak_token,
        -- char offsets are 0-based and end-exclusive; substring() is 1-based
        substring(text, greatest(char_start - 80, 0) + 1, char_start - greatest(char_start - 80, 0))
            || '[[' || substring(text, char_start + 1, char_end - char_start) || ']]'
            || substring(text, char_end + 1, 80) as context
    from with_tokens
)

select * from final
order by max_act desc, dataset, sample_id
