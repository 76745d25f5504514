-- selected_transfer: do the selected features still fire, and as strongly, on each dataset?
--
-- Uses   : views/layer_class_sizes, views/share_of
-- Inputs : views `selected_features` (layer, feature_id, direction), `samples` (dataset, sample_id, role)
--          and `activations` (layer, dataset, sample_id, feature_id, max_act).
-- Params : $layer          integer  the layer
--          $train_datasets varchar[] or NULL  the reference datasets; NULL = every dataset whose role
--                                            is 'train'
-- Output : for each dataset with activations at the layer, and for direction 'positive', 'negative'
--          and 'all' (both together):
--          n_selected, n_firing (selected features with any activation row on the dataset),
--          frac_firing = n_firing / n_selected,
--          mean_act = mean over the selected features of SUM(max_act) / n_samples of the dataset,
--          train_mean_act = the same on the pooled training samples,
--          mean_act_ratio = mean_act / train_mean_act (1.0: as strong as in training).
-- Grain  : layer x dataset x direction.

with

selected as (
    select
        feature_id,
        direction
    from selected_features
    where layer = $layer
),

selected_activations as (
    select
        activations.dataset,
        activations.sample_id,
        activations.feature_id,
        activations.max_act
    from activations
    semi join selected
        on activations.feature_id = selected.feature_id
    where activations.layer = $layer
        and activations.max_act > 0
),

dataset_sizes as (
    select
        dataset,
        role,
        n_samples
    from layer_class_sizes($layer)
),

train_samples as (
    select
        dataset,
        sample_id
    from samples
    where coalesce(list_contains($train_datasets::varchar[], dataset), role = 'train')
),

train_activations as (
    select
        selected_activations.feature_id,
        selected_activations.max_act
    from selected_activations
    semi join train_samples
        using (dataset, sample_id)
),

train_means as (
    select
        selected.feature_id,
        coalesce(sum(train_activations.max_act), 0)
            / nullif((select count(*) from train_samples), 0) as train_mean_act
    from selected
    left join train_activations
        on selected.feature_id = train_activations.feature_id
    group by selected.feature_id
),

dataset_sums as (
    select
        dataset,
        feature_id,
        sum(max_act) as sum_act
    from selected_activations
    group by dataset, feature_id
),

per_feature as (
    select
        dataset_sizes.dataset,
        dataset_sizes.role,
        dataset_sizes.n_samples,
        selected.feature_id,
        selected.direction,
        dataset_sums.sum_act is not null as fires,
        share_of(dataset_sums.sum_act, dataset_sizes.n_samples) as mean_act,
        train_means.train_mean_act
    from dataset_sizes
    cross join selected
    left join dataset_sums
        on dataset_sizes.dataset = dataset_sums.dataset
        and selected.feature_id = dataset_sums.feature_id
    left join train_means
        on selected.feature_id = train_means.feature_id
),

per_direction as (
    select
        dataset,
        any_value(role) as role,
        any_value(n_samples) as n_samples,
        case when grouping(direction) = 1 then 'all' else direction end as direction,
        count(*) as n_selected,
        count(*) filter (where fires) as n_firing,
        avg(mean_act) as mean_act,
        avg(train_mean_act) as train_mean_act
    from per_feature
    group by grouping sets ((dataset, direction), (dataset))
),

final as (
    select
        cast($layer as integer) as layer,
        dataset,
        role,
        direction,
        n_samples,
        n_selected,
        n_firing,
        n_firing / n_selected as frac_firing,
        mean_act,
        train_mean_act,
        mean_act / nullif(train_mean_act, 0) as mean_act_ratio
    from per_direction
)

select * from final
order by dataset, direction
