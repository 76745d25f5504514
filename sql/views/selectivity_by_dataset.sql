-- views/selectivity_by_dataset: per-feature class selectivity computed separately on every dataset that has
-- both classes (stats/dataset_selectivity writes it; stats/selectivity_rank_correlation compares datasets).
--
-- Uses   : views/class_sizes, views/labelled_activations
-- Inputs : views `samples` (dataset, sample_id, is_positive, role) and
--          `activations` (layer, dataset, sample_id, feature_id, max_act).
-- Output : table macro selectivity_by_dataset(at_layer integer, min_act double): one row per (dataset,
--          feature) with at least one activation row on the dataset, for datasets with at least one positive
--          and one negative sample: layer, dataset, role, feature_id, n_pos, n_neg, pos_mean, neg_mean,
--          pos_freq, neg_freq, max_act, selectivity, is_active (max_act on the dataset reaches `min_act`).
--          Means are SUM / class size of that dataset (inactive samples count as 0), selectivity =
--          (pos_mean - neg_mean) / (pos_mean + neg_mean) as in feature_stats.
-- Grain  : layer x dataset x feature_id.

create or replace temp macro selectivity_by_dataset(at_layer, min_act) as table
with

two_class_sizes as (
    select
        dataset,
        role,
        n_pos,
        n_neg
    from class_sizes
    where n_pos > 0
        and n_neg > 0
),

per_feature as (
    select
        labelled_activations.dataset,
        labelled_activations.feature_id,
        coalesce(sum(labelled_activations.max_act) filter (where labelled_activations.is_positive), 0) as pos_sum,
        coalesce(sum(labelled_activations.max_act) filter (where not labelled_activations.is_positive), 0)
            as neg_sum,
        count(*) filter (where labelled_activations.is_positive) as pos_count,
        count(*) filter (where not labelled_activations.is_positive) as neg_count,
        max(labelled_activations.max_act) as max_act
    from labelled_activations
    semi join two_class_sizes
        on labelled_activations.dataset = two_class_sizes.dataset
    where labelled_activations.layer = at_layer
        and labelled_activations.max_act > 0
    group by labelled_activations.dataset, labelled_activations.feature_id
),

means as (
    select
        per_feature.dataset,
        two_class_sizes.role,
        per_feature.feature_id,
        two_class_sizes.n_pos,
        two_class_sizes.n_neg,
        per_feature.pos_sum / two_class_sizes.n_pos as pos_mean,
        per_feature.neg_sum / two_class_sizes.n_neg as neg_mean,
        per_feature.pos_count / two_class_sizes.n_pos as pos_freq,
        per_feature.neg_count / two_class_sizes.n_neg as neg_freq,
        per_feature.max_act
    from per_feature
    inner join two_class_sizes
        on per_feature.dataset = two_class_sizes.dataset
)

select
    cast(at_layer as integer) as layer,
    *,  -- dataset, role, feature_id, n_pos, n_neg, pos_mean, neg_mean, pos_freq, neg_freq, max_act
    (pos_mean - neg_mean) / nullif(pos_mean + neg_mean, 0) as selectivity,
    max_act >= min_act as is_active
from means
