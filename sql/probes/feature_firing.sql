-- feature_firing: how often each of some features fires on every dataset of a layer, per class.
--
-- Uses   : views/firing_rates
-- Inputs : views `activations` (layer, dataset, sample_id, feature_id, max_act), `samples`.
-- Params : $layer integer, $feature_ids integer[] (the features of the report).
-- Output : one row per (feature, dataset extracted at $layer): firing_rate = samples with the feature
--          active / samples of the dataset; firing_rate_pos / _neg per class (NULL without that class);
--          mean_max_act = SUM(max_act) / samples (inactive samples count as 0).
-- Grain  : feature_id x dataset.

with

wanted as (
    select unnest($feature_ids::integer[]) as feature_id
),

final as (
    select *
    from firing_rates('wanted', $layer, true)
)

select * from final
order by feature_id, dataset
