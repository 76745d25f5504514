-- feature_stats: how each SAE feature of one layer separates the two classes on the training datasets.
--
-- Uses   : views/labelled_activations
-- Inputs : views `samples` (dataset, sample_id, is_positive, role) and
--          `activations` (layer, dataset, sample_id, feature_id, max_act, mean_act).
-- Params : $layer          integer  the layer to describe
--          $min_act        double   a feature `is_active` when its max_act over the training samples
--                                   reaches this (seed: 1.0)
--          $train_datasets varchar[] or NULL  datasets to pool; NULL = every dataset whose role is 'train'
-- Output : one row per feature with at least one activation row on the training samples.
--          pos_mean / neg_mean are SUM(x) / class size, so samples where a feature is inactive count as 0
--          (a feature that never fires in a class has mean 0 and frequency 0 there, not NULL).
--          selectivity = (pos_mean - neg_mean) / (pos_mean + neg_mean), in [-1, 1]; it is NULL only when a
--          class has no training samples at all (the `train_classes` check catches that).
--          The *_mean_act columns repeat the means and selectivity on mean_act (mean over all tokens).
--          rank_z: the two-sided Mann-Whitney U test of positives vs negatives on max_act (the value
--          selectivity uses) as a standard normal deviate, (|U - n_pos n_neg / 2| - 0.5) / sigma: ties get
--          their average rank and sigma the tie correction; a training sample with no row for the feature
--          has max_act 0, so the zeros are one tie block at the bottom (ranks 1..n_zero). It is the
--          asymptotic test with continuity correction, as scipy.stats.mannwhitneyu(method="asymptotic").
--          NULL when a class is empty; 0 (p = 1) when every sample ties (sigma 0): never NaN.
--          dagster_project.lib.stats.feature_stats turns it into p_value
--          (2 * the normal upper tail, at most 1) and the Benjamini-Hochberg q_value over the layer's rows.
-- Grain  : layer x feature_id.

with

train_samples as (
    select
        dataset,
        sample_id,
        is_positive
    from samples
    where coalesce(list_contains($train_datasets::varchar[], dataset), role = 'train')
),

class_sizes as (
    select
        count(*) filter (where is_positive) as n_pos,
        count(*) filter (where not is_positive) as n_neg
    from train_samples
),

train_activations as (
    select
        feature_id,
        max_act,
        mean_act,
        is_positive
    from labelled_activations
    where layer = $layer
        and max_act > 0
        and coalesce(list_contains($train_datasets::varchar[], dataset), role = 'train')
),

per_feature as (
    select
        feature_id,
        coalesce(sum(max_act) filter (where is_positive), 0) as pos_sum,
        coalesce(sum(max_act) filter (where not is_positive), 0) as neg_sum,
        coalesce(sum(mean_act) filter (where is_positive), 0) as pos_sum_mean_act,
        coalesce(sum(mean_act) filter (where not is_positive), 0) as neg_sum_mean_act,
        count(*) filter (where is_positive) as pos_count,
        count(*) filter (where not is_positive) as neg_count,
        max(max_act) as max_act
    from train_activations
    group by feature_id
),

-- Mann-Whitney ranks: one row per distinct active value of a feature, with how many training samples
-- (and positive ones) share it; the zeros (samples without a row) come first, so an active value's rank is
-- n_zero + its rank among the active values, the average over its tie block.
tie_blocks as (
    select
        feature_id,
        max_act,
        count(*)::double as n_tied,
        (count(*) filter (where is_positive))::double as n_tied_pos
    from train_activations
    group by feature_id, max_act
),

active_ranks as (
    select
        feature_id,
        n_tied,
        n_tied_pos,
        sum(n_tied) over (
            partition by feature_id order by max_act rows between unbounded preceding and current row
        ) - (n_tied - 1) / 2 as active_rank
    from tie_blocks
),

rank_sums as (
    select
        feature_id,
        sum(n_tied_pos * active_rank) as pos_active_rank_sum,
        sum(n_tied * n_tied * n_tied - n_tied) as active_tie_term
    from active_ranks
    group by feature_id
),

rank_test as (
    select
        per_feature.feature_id,
        class_sizes.n_pos::double as n1,
        class_sizes.n_neg::double as n2,
        (class_sizes.n_pos + class_sizes.n_neg - per_feature.pos_count - per_feature.neg_count)::double
            as n_zero,
        (class_sizes.n_pos - per_feature.pos_count)::double as n_zero_pos,
        per_feature.pos_count::double as n_active_pos,
        rank_sums.pos_active_rank_sum,
        rank_sums.active_tie_term
    from per_feature
    cross join class_sizes
    inner join rank_sums on per_feature.feature_id = rank_sums.feature_id
),

u_stats as (
    select
        feature_id,
        n1,
        n2,
        -- U of the positives: their rank sum minus its minimum n1 (n1 + 1) / 2
        n_zero_pos * (n_zero + 1) / 2 + n_active_pos * n_zero + pos_active_rank_sum
            - n1 * (n1 + 1) / 2 as u_pos,
        -- n1 n2 / 12 * ((n + 1) - sum over tie blocks of (t^3 - t) / (n (n - 1))), the zero block included
        n1 * n2 / 12 * (
            (n1 + n2 + 1)
            - (active_tie_term + n_zero * n_zero * n_zero - n_zero) / ((n1 + n2) * (n1 + n2 - 1))
        ) as u_var
    from rank_test
),

z_scores as (
    select
        feature_id,
        case
            when n1 = 0 or n2 = 0 then null
            when u_var <= 0 then 0.0
            else (abs(u_pos - n1 * n2 / 2) - 0.5) / sqrt(u_var)
        end as rank_z
    from u_stats
),

means as (
    select
        per_feature.feature_id,
        class_sizes.n_pos,
        class_sizes.n_neg,
        per_feature.pos_sum / nullif(class_sizes.n_pos, 0) as pos_mean,
        per_feature.neg_sum / nullif(class_sizes.n_neg, 0) as neg_mean,
        per_feature.pos_count / nullif(class_sizes.n_pos, 0) as pos_freq,
        per_feature.neg_count / nullif(class_sizes.n_neg, 0) as neg_freq,
        per_feature.max_act,
        per_feature.pos_sum_mean_act / nullif(class_sizes.n_pos, 0) as pos_mean_mean_act,
        per_feature.neg_sum_mean_act / nullif(class_sizes.n_neg, 0) as neg_mean_mean_act,
        z_scores.rank_z
    from per_feature
    cross join class_sizes
    inner join z_scores on per_feature.feature_id = z_scores.feature_id
),

final as (
    select
        cast($layer as integer) as layer,
        feature_id,
        n_pos,
        n_neg,
        pos_mean,
        neg_mean,
        pos_freq,
        neg_freq,
        max_act,
        (pos_mean - neg_mean) / nullif(pos_mean + neg_mean, 0) as selectivity,
        pos_mean_mean_act,
        neg_mean_mean_act,
        (pos_mean_mean_act - neg_mean_mean_act)
            / nullif(pos_mean_mean_act + neg_mean_mean_act, 0) as selectivity_mean_act,
        max_act >= $min_act as is_active,
        rank_z
    from means
)

select * from final
order by feature_id
