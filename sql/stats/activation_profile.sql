-- activation_profile: how dense and how strong one layer's SAE activations are on each dataset.
--
-- Inputs : views `samples` (dataset, sample_id), `tokens` (dataset, sample_id, token_pos) and
--          `activations` (layer, dataset, sample_id, feature_id, max_act).
-- Params : $layer     integer  the layer to describe
--          $sae_width integer  number of features of the SAE (for the dead-feature count)
--          $datasets  varchar[] or NULL  datasets to describe; NULL = every dataset with activations
--                                        at this layer
-- Output : one row per dataset with activations at the layer:
--          n_samples, n_tokens (rows of `tokens`; 0 when none);
--          active features per sample, over *all* samples (a sample with no active feature counts as 0):
--            active_per_sample_mean / _median / _p90, n_samples_no_active;
--          max_act magnitude over the active (sample, feature) rows: max_act_mean / _p50 / _p99;
--          n_features_active (distinct features with any row) and n_dead_features
--          ($sae_width minus those: features never active on this dataset).
--          Percentiles are quantile_cont (linear interpolation, same as numpy.percentile's default).
-- Grain  : layer x dataset.

with

layer_activations as (
    select
        dataset,
        sample_id,
        feature_id,
        max_act
    from activations
    where layer = $layer
        and max_act > 0
        and coalesce(list_contains($datasets::varchar[], dataset), true)
),

profiled_datasets as (
    select distinct dataset
    from layer_activations
),

dataset_samples as (
    select
        samples.dataset,
        samples.sample_id
    from samples
    inner join profiled_datasets
        on samples.dataset = profiled_datasets.dataset
),

active_counts as (
    select
        dataset,
        sample_id,
        count(*) as n_active
    from layer_activations
    group by dataset, sample_id
),

per_sample as (
    select
        dataset_samples.dataset,
        dataset_samples.sample_id,
        coalesce(active_counts.n_active, 0) as n_active
    from dataset_samples
    left join active_counts
        using (dataset, sample_id)
),

sample_summary as (
    select
        dataset,
        count(*) as n_samples,
        count(*) filter (where n_active = 0) as n_samples_no_active,
        avg(n_active) as active_per_sample_mean,
        quantile_cont(n_active, 0.5) as active_per_sample_median,
        quantile_cont(n_active, 0.9) as active_per_sample_p90
    from per_sample
    group by dataset
),

magnitude_quantiles as (
    select
        dataset,
        count(*) as n_active_rows,
        count(distinct feature_id) as n_features_active,
        avg(max_act) as max_act_mean,
        -- one list-valued quantile sorts the values once (two calls sort twice)
        quantile_cont(max_act, [0.5, 0.99]) as max_act_quantiles
    from layer_activations
    group by dataset
),

magnitude_summary as (
    select
        dataset,
        n_active_rows,
        n_features_active,
        max_act_mean,
        max_act_quantiles[1] as max_act_p50,
        max_act_quantiles[2] as max_act_p99
    from magnitude_quantiles
),

token_counts as (
    select
        tokens.dataset,
        count(*) as n_tokens
    from tokens
    inner join profiled_datasets
        on tokens.dataset = profiled_datasets.dataset
    group by tokens.dataset
),

final as (
    select
        cast($layer as integer) as layer,
        sample_summary.dataset,
        sample_summary.n_samples,
        coalesce(token_counts.n_tokens, 0) as n_tokens,
        sample_summary.active_per_sample_mean,
        sample_summary.active_per_sample_median,
        sample_summary.active_per_sample_p90,
        sample_summary.n_samples_no_active,
        magnitude_summary.n_active_rows,
        magnitude_summary.max_act_mean,
        magnitude_summary.max_act_p50,
        magnitude_summary.max_act_p99,
        magnitude_summary.n_features_active,
        cast($sae_width as integer) - magnitude_summary.n_features_active as n_dead_features
    from sample_summary
    inner join magnitude_summary
        on sample_summary.dataset = magnitude_summary.dataset
    left join token_counts
        on sample_summary.dataset = token_counts.dataset
)

select * from final
order by dataset
