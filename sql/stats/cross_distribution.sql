-- cross_distribution: how much the active feature sets of two datasets overlap, at one layer.
--
-- Inputs : view `activations` (layer, dataset, feature_id, max_act).
-- Params : $layer   integer  the layer to compare
--          $min_act double   a feature is active on a dataset when its max_act there reaches this (seed 1.0)
-- Output : one row per ordered pair of datasets with activations at the layer, the diagonal included
--          (so a heatmap needs no reshaping): n_active_a, n_active_b, n_both, n_either,
--          jaccard = n_both / n_either (NULL when neither has an active feature) and
--          frac_a_in_b = n_both / n_active_a (how much of A's active set B also uses).
-- Grain  : layer x dataset_a x dataset_b.

with

dataset_features as (
    select
        dataset,
        feature_id,
        max(max_act) as peak_act
    from activations
    where layer = $layer
    group by dataset, feature_id
),

layer_datasets as (
    select distinct dataset
    from dataset_features
),

active_sets as (
    select
        dataset,
        feature_id
    from dataset_features
    where peak_act >= $min_act
),

set_sizes as (
    select
        layer_datasets.dataset,
        count(active_sets.feature_id) as n_active
    from layer_datasets
    left join active_sets
        on layer_datasets.dataset = active_sets.dataset
    group by layer_datasets.dataset
),

intersections as (
    select
        set_a.dataset as dataset_a,
        set_b.dataset as dataset_b,
        count(*) as n_both
    from active_sets as set_a
    inner join active_sets as set_b
        on set_a.feature_id = set_b.feature_id
    group by set_a.dataset, set_b.dataset
),

pairs as (
    select
        sizes_a.dataset as dataset_a,
        sizes_b.dataset as dataset_b,
        sizes_a.n_active as n_active_a,
        sizes_b.n_active as n_active_b,
        coalesce(intersections.n_both, 0) as n_both
    from set_sizes as sizes_a
    cross join set_sizes as sizes_b
    left join intersections
        on sizes_a.dataset = intersections.dataset_a
        and sizes_b.dataset = intersections.dataset_b
),

final as (
    select
        cast($layer as integer) as layer,
        dataset_a,
        dataset_b,
        n_active_a,
        n_active_b,
        n_both,
        n_active_a + n_active_b - n_both as n_either,
        n_both / nullif(n_active_a + n_active_b - n_both, 0) as jaccard,
        n_both / nullif(n_active_a, 0) as frac_a_in_b
    from pairs
)

select * from final
order by dataset_a, dataset_b
