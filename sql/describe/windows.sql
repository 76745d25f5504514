-- describe/windows: the windows each selected feature of a layer is described and scored on.
--
-- Uses   : views/layer_datasets, views/labelled_activations, views/draw_order
-- Inputs : views `selected_features` (layer, feature_id, rank), `activations` (pooled rows; a row exists
--          only where the feature fired, max_act > 0), `samples` (label, is_positive) and `tokens`
--          (sample lengths in tokens).
-- Params : $layer                   integer          the layer
--          $max_features            integer or NULL  the first N selected features by rank; NULL = all
--          $top_k                   integer          activating windows shown to the describer
--          $n_holdout               integer          activating windows held out for scoring
--          $n_validation            integer          activating windows held out for choosing among candidate
--                                                    descriptions (best-of-n); 0 when there is one candidate
--          $n_negatives             integer          negative windows shown to the describer
--          $n_holdout_negatives     integer          negative windows held out for scoring
--          $n_validation_negatives  integer          negative windows held out for choosing a candidate
--          $sampling                varchar          how the describer's activating windows are drawn: 'top'
--                                                    (ranks 1..top_k by pooled max_act), 'deciles' (round-robin
--                                                    over the feature's activation deciles, a seeded draw within
--                                                    each) or 'random' (a seeded draw from every activating sample)
--          $holdout_sampling        varchar          the same for the held-out and validation windows, from the
--                                                    samples the describer was not shown: 'next' (the next ranks
--                                                    by max_act), 'deciles' or 'random'
--          $negatives               varchar          'matched' (class, dataset, length) or 'near_miss' (class,
--                                                    then the nearest by cosine of the layer's pooled residual
--                                                    mean: zero-activation texts the model represents most like
--                                                    the anchor's)
--          $seed                    integer          seeds the 'deciles' / 'random' draws
-- Output : one row per window: feature_id, feature_rank, part ('top' | 'negative' | 'holdout' |
--          'holdout_negative' | 'validation' | 'validation_negative'), part_rank (1-based within the part),
--          dataset, sample_id, label, is_positive, n_tokens, center (the token the window is centred on),
--          max_act (0 for negatives), decile (1 = the strongest tenth of the feature's activating samples; NULL
--          for negatives). The parts are drawn in order describer, held-out, validation, each from the samples
--          the earlier ones left, so no sample is in two parts of one feature.
--          Activating windows are centred on their argmax token. A negative is a sample of a dataset
--          that has activations at the layer where the feature never fired (no pooled row), matched to
--          one activating window of its part (its anchor: anchor_dataset, anchor_sample_id) by, in order:
--          the same class (is_positive), (near_miss: the highest residual cosine, `similarity`), the same
--          dataset, the nearest length in tokens; ties by dataset,
--          sample_id. Picks are greedy and round-robin: negative k serves top anchor ((k-1) mod n_top)+1
--          and takes its best match among the samples not yet picked for the feature; the held-out
--          negatives then do the same over the held-out anchors, and the validation negatives over the
--          validation anchors. So a negative matches its anchor worse
--          than another sample would only when that sample was already picked. Picks stop when an anchor
--          has no unused sample left. A negative window is centred where its anchor's peak is, scaled
--          to its length; same_class, same_dataset and length_diff say how well it matches its anchor.
-- Grain  : feature_id x part x part_rank.

with recursive

features as (
    select
        cast(feature_id as integer) as feature_id,
        cast(rank as integer) as feature_rank
    from selected_features
    where layer = $layer
    qualify $max_features is null or row_number() over (order by rank, feature_id) <= $max_features
),

sample_lengths as (
    select
        dataset,
        sample_id,
        max(token_pos) + 1 as n_tokens
    from tokens
    where dataset in (select dataset from layer_datasets($layer))
    group by dataset, sample_id
),

sample_info as (
    select
        samples.dataset,
        samples.sample_id,
        samples.label,
        samples.is_positive,
        sample_lengths.n_tokens
    from samples
    inner join sample_lengths
        using (dataset, sample_id)
),

activating as (
    select
        feature_id,
        dataset,
        sample_id,
        label,
        is_positive,
        n_tokens,
        center,
        max_act,
        row_number() over (partition by feature_id order by max_act desc, dataset, sample_id) as act_rank,
        ntile(10) over (partition by feature_id order by max_act desc, dataset, sample_id) as decile,
        hash($seed, feature_id, dataset, sample_id) as rand_key
    from (
        select
            labelled_activations.feature_id,
            labelled_activations.dataset,
            labelled_activations.sample_id,
            labelled_activations.label,
            labelled_activations.is_positive,
            sample_lengths.n_tokens,
            labelled_activations.argmax_token as center,
            labelled_activations.max_act
        from labelled_activations
        inner join sample_lengths
            using (dataset, sample_id)
        where labelled_activations.layer = $layer
            and labelled_activations.feature_id in (select feature_id from features)
            and labelled_activations.max_act > 0
    )
),

-- the describer's windows: the first top_k in the order of the chosen sampling (views/draw_order)
shown as (
    select
        *,
        row_number() over (
            partition by feature_id
            order by draw_order($sampling, 'top', act_rank, in_decile, decile, rand_key), dataset, sample_id
        ) as part_rank
    from (
        select
            *,
            row_number() over (partition by feature_id, decile order by rand_key, dataset, sample_id) as in_decile
        from activating
    )
    qualify part_rank <= $top_k
),

-- what the describer was not shown, in the held-out sampling's order: the first n_holdout are held out
-- for scoring, the next n_validation for choosing among candidate descriptions
rest as (
    select
        *,
        row_number() over (
            partition by feature_id
            order by draw_order($holdout_sampling, 'next', act_rank, in_decile, decile, rand_key), dataset, sample_id
        ) as rest_rank
    from (
        select
            activating.*,
            row_number() over (partition by feature_id, decile order by rand_key, dataset, sample_id) as in_decile
        from activating
        anti join shown
            on activating.feature_id = shown.feature_id
            and activating.dataset = shown.dataset
            and activating.sample_id = shown.sample_id
    )
    qualify rest_rank <= $n_holdout + $n_validation
),

anchors as (
    select
        feature_id, dataset, sample_id, label, is_positive, n_tokens, center, max_act, decile,
        'top' as part,
        part_rank
    from shown
    union all
    select
        feature_id, dataset, sample_id, label, is_positive, n_tokens, center, max_act, decile,
        case when rest_rank <= $n_holdout then 'holdout' else 'validation' end as part,
        case when rest_rank <= $n_holdout then rest_rank else rest_rank - $n_holdout end as part_rank
    from rest
),

candidates as (
    select
        features.feature_id,
        sample_info.*
    from features
    cross join sample_info
    anti join activating
        using (feature_id, dataset, sample_id)
),

pairs as (
    -- every (anchor, candidate) pair, the candidate's rank as a match for the anchor; an anchor never needs
    -- more than (all picks + 1) of them
    select
        anchors.feature_id,
        anchors.part as anchor_part,
        anchors.part_rank as anchor_rank,
        anchors.dataset as anchor_dataset,
        anchors.sample_id as anchor_sample_id,
        candidates.dataset,
        candidates.sample_id,
        candidates.dataset || ':' || candidates.sample_id as sample_key,
        candidates.label,
        candidates.is_positive,
        candidates.n_tokens,
        least(
            candidates.n_tokens - 1,
            cast(floor((anchors.center + 0.5) * candidates.n_tokens / anchors.n_tokens) as integer)
        ) as center,
        candidates.is_positive = anchors.is_positive as same_class,
        candidates.dataset = anchors.dataset as same_dataset,
        abs(candidates.n_tokens - anchors.n_tokens) as length_diff,
        list_cosine_similarity(anchor_resid.resid, candidate_resid.resid) as similarity,
        row_number() over (
            partition by anchors.feature_id, anchors.part, anchors.part_rank
            order by
                candidates.is_positive = anchors.is_positive desc,
                case when $negatives = 'near_miss'
                    then -coalesce(list_cosine_similarity(anchor_resid.resid, candidate_resid.resid), -2)
                    else 0 end,
                candidates.dataset = anchors.dataset desc,
                abs(candidates.n_tokens - anchors.n_tokens),
                candidates.dataset,
                candidates.sample_id
        ) as match_rank
    from anchors
    inner join candidates
        on anchors.feature_id = candidates.feature_id
    left join describe_residuals as anchor_resid
        on anchors.dataset = anchor_resid.dataset
        and anchors.sample_id = anchor_resid.sample_id
    left join describe_residuals as candidate_resid
        on candidates.dataset = candidate_resid.dataset
        and candidates.sample_id = candidate_resid.sample_id
    qualify match_rank <= $n_negatives + $n_holdout_negatives + $n_validation_negatives + 1
),

anchor_counts as (
    select
        feature_id,
        count(*) filter (where part = 'top') as n_top,
        count(*) filter (where part = 'holdout') as n_holdout,
        count(*) filter (where part = 'validation') as n_validation
    from anchors
    group by feature_id
),

-- pick k serves one anchor: round-robin over the top anchors for the describer's negatives (k = 1 ..
-- n_negatives), then over the held-out anchors for the held-out negatives, then over the validation anchors
steps as (
    select
        anchor_counts.feature_id,
        step.k,
        case
            when step.k <= $n_negatives then 'top'
            when step.k <= $n_negatives + $n_holdout_negatives then 'holdout'
            else 'validation'
        end as anchor_part,
        case
            when step.k <= $n_negatives then (step.k - 1) % nullif(anchor_counts.n_top, 0) + 1
            when step.k <= $n_negatives + $n_holdout_negatives
                then (step.k - $n_negatives - 1) % nullif(anchor_counts.n_holdout, 0) + 1
            else (step.k - $n_negatives - $n_holdout_negatives - 1) % nullif(anchor_counts.n_validation, 0) + 1
        end as anchor_rank
    from anchor_counts
    cross join range(1, $n_negatives + $n_holdout_negatives + $n_validation_negatives + 1) as step(k)
),

-- greedy, one pick per step: the step's anchor takes its best match among the samples not yet picked
picks as (
    select
        feature_id,
        0 as k,
        []::varchar[] as used,
        null::varchar as anchor_part,
        null::bigint as anchor_rank,
        null::varchar as anchor_dataset,
        null::integer as anchor_sample_id,
        null::varchar as dataset,
        null::integer as sample_id,
        null::varchar as label,
        null::boolean as is_positive,
        null::bigint as n_tokens,
        null::integer as center,
        null::boolean as same_class,
        null::boolean as same_dataset,
        null::bigint as length_diff,
        null::double as similarity
    from anchor_counts

    union all

    select
        picks.feature_id,
        picks.k + 1 as k,
        list_append(picks.used, pairs.sample_key) as used,
        pairs.anchor_part,
        pairs.anchor_rank,
        pairs.anchor_dataset,
        pairs.anchor_sample_id,
        pairs.dataset,
        pairs.sample_id,
        pairs.label,
        pairs.is_positive,
        pairs.n_tokens,
        pairs.center,
        pairs.same_class,
        pairs.same_dataset,
        pairs.length_diff,
        pairs.similarity
    from picks
    inner join steps
        on picks.feature_id = steps.feature_id
        and steps.k = picks.k + 1
    inner join pairs
        on picks.feature_id = pairs.feature_id
        and steps.anchor_part = pairs.anchor_part
        and steps.anchor_rank = pairs.anchor_rank
    where not list_contains(picks.used, pairs.sample_key)
    qualify row_number() over (partition by picks.feature_id order by pairs.match_rank) = 1
),

negatives as (
    select
        *,
        case
            when k <= $n_negatives then 'negative'
            when k <= $n_negatives + $n_holdout_negatives then 'holdout_negative'
            else 'validation_negative'
        end as part,
        case
            when k <= $n_negatives then k
            when k <= $n_negatives + $n_holdout_negatives then k - $n_negatives
            else k - $n_negatives - $n_holdout_negatives
        end as part_rank
    from picks
    where k >= 1
),

all_windows as (
    select
        feature_id, part, part_rank, dataset, sample_id, label, is_positive, n_tokens, center, max_act, decile,
        null::varchar as anchor_dataset,
        null::integer as anchor_sample_id,
        null::boolean as same_class,
        null::boolean as same_dataset,
        null::bigint as length_diff,
        null::double as similarity
    from anchors
    union all
    select
        feature_id, part, part_rank, dataset, sample_id, label, is_positive, n_tokens, center, 0.0 as max_act,
        null::bigint as decile, anchor_dataset, anchor_sample_id, same_class, same_dataset, length_diff, similarity
    from negatives
),

final as (
    select
        all_windows.feature_id,
        features.feature_rank,
        all_windows.part,
        cast(all_windows.part_rank as integer) as part_rank,
        all_windows.dataset,
        cast(all_windows.sample_id as integer) as sample_id,
        all_windows.label,
        all_windows.is_positive,
        cast(all_windows.n_tokens as integer) as n_tokens,
        cast(all_windows.center as integer) as center,
        cast(all_windows.max_act as double) as max_act,
        cast(all_windows.decile as integer) as decile,
        all_windows.anchor_dataset,
        all_windows.anchor_sample_id,
        all_windows.same_class,
        all_windows.same_dataset,
        cast(all_windows.length_diff as integer) as length_diff,
        cast(all_windows.similarity as double) as similarity
    from all_windows
    inner join features
        on all_windows.feature_id = features.feature_id
)

select * from final
order by
    feature_rank,
    feature_id,
    case part
        when 'top' then 1 when 'negative' then 2 when 'holdout' then 3 when 'holdout_negative' then 4
        when 'validation' then 5 else 6
    end,
    part_rank
