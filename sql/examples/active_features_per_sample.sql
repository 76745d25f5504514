-- active_features_per_sample: how many features fire on each sample, per dataset, at a layer?
-- (spot empty samples, outliers, and differences in density between classes or sources)
--
-- Inputs : views `activations`, `samples`.
-- Params : $layer integer
-- Output : one row per sample of every dataset with activations at the layer: n_active (0 when no
--          feature fires), sum and peak of max_act, the feature with the highest max_act.
-- Grain  : dataset x sample_id.

with

per_sample as (
    select
        dataset,
        sample_id,
        count(*) as n_active,
        sum(max_act) as sum_max_act,
        max(max_act) as peak_act,
        arg_max(feature_id, max_act) as peak_feature_id
    from activations
    where layer = $layer
    group by dataset, sample_id
),

layer_datasets as (
    select distinct dataset
    from per_sample
),

final as (
    select
        samples.dataset,
        samples.sample_id,
        samples.role,
        samples.label,
        samples.is_positive,
        coalesce(per_sample.n_active, 0) as n_active,
        coalesce(per_sample.sum_max_act, 0) as sum_max_act,
        per_sample.peak_act,
        per_sample.peak_feature_id
    from samples
    semi join layer_datasets
        on samples.dataset = layer_datasets.dataset
    left join per_sample
        on samples.dataset = per_sample.dataset
        and samples.sample_id = per_sample.sample_id
)

select * from final
order by dataset, sample_id
