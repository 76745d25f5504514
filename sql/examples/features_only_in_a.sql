-- features_only_in_a: which features fire on dataset $dataset_a but never on dataset $dataset_b?
-- (e.g. features specific to a source's formatting, or missing from an out-of-distribution set)
--
-- Inputs : views `activations`, `samples`.
-- Params : $layer integer, $dataset_a varchar, $dataset_b varchar
-- Output : one row per feature with an activation row on $dataset_a and none on $dataset_b:
--          how many samples of A it fires on, firing_rate (of A's samples), mean_act (SUM / A's
--          sample count) and peak max_act; most frequent first.
-- Grain  : feature_id.

with

features_a as (
    select
        feature_id,
        count(*) as n_firing,
        sum(max_act) as sum_act,
        max(max_act) as peak_act
    from activations
    where layer = $layer
        and dataset = $dataset_a
    group by feature_id
),

features_b as (
    select distinct feature_id
    from activations
    where layer = $layer
        and dataset = $dataset_b
),

size_a as (
    select count(*) as n_samples
    from samples
    where dataset = $dataset_a
),

final as (
    select
        features_a.feature_id,
        features_a.n_firing,
        features_a.n_firing / size_a.n_samples as firing_rate,
        features_a.sum_act / size_a.n_samples as mean_act,
        features_a.peak_act
    from features_a
    cross join size_a
    anti join features_b
        on features_a.feature_id = features_b.feature_id
)

select * from final
order by n_firing desc, peak_act desc, feature_id
