-- feature_firing: how often each of some features fires on every dataset of a layer, per class.
--
-- Uses   : views/layer_class_sizes, views/labelled_activations
-- Inputs : views `activations` (layer, dataset, sample_id, feature_id, max_act), `samples`.
-- Params : $layer integer, $feature_ids integer[] (the features of the report).
-- Output : one row per (feature, dataset extracted at $layer): firing_rate = samples with the feature
--          active / samples of the dataset; firing_rate_pos / _neg per class (NULL without that class);
--          mean_max_act = SUM(max_act) / samples (inactive samples count as 0).
-- Grain  : feature_id x dataset.

with

dataset_sizes as (
    select
        dataset,
        role,
        n_samples as n,
        n_pos,
        n_neg
    from layer_class_sizes($layer)
),

wanted as (
    select unnest($feature_ids::integer[]) as feature_id
),

fired as (
    select
        feature_id,
        dataset,
        count(*) as n_fired,
        count(*) filter (where is_positive) as n_fired_pos,
        count(*) filter (where not is_positive) as n_fired_neg,
        sum(max_act) as sum_max_act
    from labelled_activations
    where layer = $layer
        and list_contains($feature_ids::integer[], feature_id)
        and max_act > 0
    group by feature_id, dataset
),

final as (
    select
        wanted.feature_id,
        dataset_sizes.dataset,
        dataset_sizes.role,
        dataset_sizes.n,
        coalesce(fired.n_fired, 0) / dataset_sizes.n as firing_rate,
        coalesce(fired.n_fired_pos, 0) / nullif(dataset_sizes.n_pos, 0) as firing_rate_pos,
        coalesce(fired.n_fired_neg, 0) / nullif(dataset_sizes.n_neg, 0) as firing_rate_neg,
        coalesce(fired.sum_max_act, 0) / dataset_sizes.n as mean_max_act
    from wanted
    cross join dataset_sizes
    left join fired
        on wanted.feature_id = fired.feature_id
        and dataset_sizes.dataset = fired.dataset
)

select * from final
order by feature_id, dataset
