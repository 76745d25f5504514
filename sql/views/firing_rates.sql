-- views/firing_rates: how often each of some features fires on every dataset extracted at a layer.
--
-- Uses   : views/layer_class_sizes, views/labelled_activations, views/share_of
-- Inputs : views `activations`, `samples` (through labelled_activations and layer_class_sizes); a relation
--          named (as a string) by the caller, a CTE of its statement, with a column feature_id: the features wanted.
-- Output : table macro firing_rates(features_of, at_layer, active_only): one row per (wanted feature,
--          dataset extracted at `at_layer`) with dataset, role, n (samples), firing_rate (samples with an
--          activation row of the feature / samples), firing_rate_pos / _neg per class (NULL without that
--          class) and mean_max_act = SUM(max_act) / samples (inactive samples count as 0). `active_only`
--          counts only rows with max_act > 0.
-- Grain  : feature_id x dataset.

create or replace temp macro firing_rates(features_of, at_layer, active_only) as table
with

wanted as (
    select distinct feature_id
    from query_table(features_of)
),

fired as (
    select feature_id, dataset, count(*) as n_fired, sum(max_act) as sum_max_act,
        count(*) filter (where is_positive) as n_fired_pos,
        count(*) filter (where not is_positive) as n_fired_neg
    from labelled_activations
    semi join wanted using (feature_id)
    where layer = at_layer and (not active_only or max_act > 0)
    group by feature_id, dataset
)

select
    wanted.feature_id,
    dataset_sizes.dataset,
    dataset_sizes.role,
    dataset_sizes.n_samples as n,
    share_of(fired.n_fired, dataset_sizes.n_samples) as firing_rate,
    share_of(fired.n_fired_pos, dataset_sizes.n_pos) as firing_rate_pos,
    share_of(fired.n_fired_neg, dataset_sizes.n_neg) as firing_rate_neg,
    share_of(fired.sum_max_act, dataset_sizes.n_samples) as mean_max_act
from wanted
cross join layer_class_sizes(at_layer) as dataset_sizes
left join fired
    on wanted.feature_id = fired.feature_id
    and dataset_sizes.dataset = fired.dataset
