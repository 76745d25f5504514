-- top_selective_features: which features separate the classes best at a layer, and how often does
-- each fire on every dataset (train, test and ood), per class?
--
-- Uses   : views/layer_class_sizes, views/labelled_activations
-- Inputs : views `feature_stats`, `activations`, `samples`.
-- Params : $layer integer, $limit integer (how many features, e.g. 20)
-- Output : one row per (top feature, dataset): the feature's rank by |selectivity| among active
--          features, its training selectivity and means, and on the dataset firing_rate (fraction of
--          samples with the feature active), firing_rate_pos / firing_rate_neg (NULL when the dataset
--          has no sample of that class).
-- Grain  : feature_id x dataset.

with

top_features as (
    select
        feature_id,
        selectivity,
        pos_mean,
        neg_mean,
        row_number() over (order by abs(selectivity) desc, feature_id) as rank
    from feature_stats
    where layer = $layer
        and is_active
        and selectivity is not null
    qualify rank <= $limit
),

firing as (
    select
        labelled_activations.dataset,
        labelled_activations.feature_id,
        count(*) as n_firing,
        count(*) filter (where labelled_activations.is_positive) as n_firing_pos,
        count(*) filter (where not labelled_activations.is_positive) as n_firing_neg
    from labelled_activations
    semi join top_features
        on labelled_activations.feature_id = top_features.feature_id
    where labelled_activations.layer = $layer
    group by labelled_activations.dataset, labelled_activations.feature_id
),

final as (
    select
        top_features.rank,
        top_features.feature_id,
        top_features.selectivity,
        top_features.pos_mean,
        top_features.neg_mean,
        dataset_sizes.dataset,
        dataset_sizes.role,
        coalesce(firing.n_firing, 0) / dataset_sizes.n_samples as firing_rate,
        coalesce(firing.n_firing_pos, 0) / nullif(dataset_sizes.n_pos, 0) as firing_rate_pos,
        coalesce(firing.n_firing_neg, 0) / nullif(dataset_sizes.n_neg, 0) as firing_rate_neg
    from top_features
    cross join layer_class_sizes($layer) as dataset_sizes
    left join firing
        on top_features.feature_id = firing.feature_id
        and dataset_sizes.dataset = firing.dataset
)

select * from final
order by rank, dataset
