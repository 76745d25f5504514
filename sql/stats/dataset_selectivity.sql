-- dataset_selectivity: per-feature class selectivity computed separately on every dataset that has
-- both classes (train, test or ood), to see whether a feature's preference transfers.
--
-- Inputs : views `samples` (dataset, sample_id, is_positive, role) and
--          `activations` (layer, dataset, sample_id, feature_id, max_act).
-- Params : $layer   integer  the layer
--          $min_act double   `is_active` when the feature's max_act on the dataset reaches this (seed 1.0)
-- Output : one row per (dataset, feature) with at least one activation row on the dataset, for
--          datasets with at least one positive and one negative sample. Means are SUM / class size of
--          that dataset (inactive samples count as 0), selectivity = (pos_mean - neg_mean) /
--          (pos_mean + neg_mean) as in feature_stats.
-- Grain  : layer x dataset x feature_id.

with

class_sizes as (
    select
        dataset,
        any_value(role) as role,
        count(*) filter (where is_positive) as n_pos,
        count(*) filter (where not is_positive) as n_neg
    from samples
    group by dataset
    having count(*) filter (where is_positive) > 0
        and count(*) filter (where not is_positive) > 0
),

labelled_activations as (
    select
        activations.dataset,
        activations.feature_id,
        activations.max_act,
        samples.is_positive
    from activations
    inner join samples
        on activations.dataset = samples.dataset
        and activations.sample_id = samples.sample_id
    semi join class_sizes
        on activations.dataset = class_sizes.dataset
    where activations.layer = $layer
        and activations.max_act > 0
),

per_feature as (
    select
        dataset,
        feature_id,
        coalesce(sum(max_act) filter (where is_positive), 0) as pos_sum,
        coalesce(sum(max_act) filter (where not is_positive), 0) as neg_sum,
        count(*) filter (where is_positive) as pos_count,
        count(*) filter (where not is_positive) as neg_count,
        max(max_act) as max_act
    from labelled_activations
    group by dataset, feature_id
),

means as (
    select
        per_feature.dataset,
        class_sizes.role,
        per_feature.feature_id,
        class_sizes.n_pos,
        class_sizes.n_neg,
        per_feature.pos_sum / class_sizes.n_pos as pos_mean,
        per_feature.neg_sum / class_sizes.n_neg as neg_mean,
        per_feature.pos_count / class_sizes.n_pos as pos_freq,
        per_feature.neg_count / class_sizes.n_neg as neg_freq,
        per_feature.max_act
    from per_feature
    inner join class_sizes
        on per_feature.dataset = class_sizes.dataset
),

final as (
    select
        cast($layer as integer) as layer,
        dataset,
        role,
        feature_id,
        n_pos,
        n_neg,
        pos_mean,
        neg_mean,
        pos_freq,
        neg_freq,
        max_act,
        (pos_mean - neg_mean) / nullif(pos_mean + neg_mean, 0) as selectivity,
        max_act >= $min_act as is_active
    from means
)

select * from final
order by dataset, feature_id
