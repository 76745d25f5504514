-- feature_selectivity: the training statistics of some features of a layer, for the report.
--
-- Inputs : view `feature_stats` (layer, feature_id, selectivity, pos_mean, neg_mean, pos_freq, neg_freq).
-- Params : $layer integer, $feature_ids integer[].
-- Output : one row per wanted feature present in feature_stats.
-- Grain  : feature_id.

with

final as (
    select feature_id, selectivity, pos_mean, neg_mean, pos_freq, neg_freq
    from feature_stats
    where layer = $layer
        and list_contains($feature_ids::integer[], feature_id)
)

select * from final
order by feature_id
