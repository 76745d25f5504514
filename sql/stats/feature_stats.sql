-- feature_stats: how each SAE feature of one layer separates the two classes on the training datasets.
--
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
        activations.feature_id,
        activations.max_act,
        activations.mean_act,
        train_samples.is_positive
    from activations
    inner join train_samples
        on activations.dataset = train_samples.dataset
        and activations.sample_id = train_samples.sample_id
    where activations.layer = $layer
        and activations.max_act > 0
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
        per_feature.neg_sum_mean_act / nullif(class_sizes.n_neg, 0) as neg_mean_mean_act
    from per_feature
    cross join class_sizes
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
        max_act >= $min_act as is_active
    from means
)

select * from final
order by feature_id
