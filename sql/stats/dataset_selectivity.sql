-- dataset_selectivity: per-feature class selectivity computed separately on every dataset that has
-- both classes (train, test or ood), to see whether a feature's preference transfers.
--
-- Uses   : views/selectivity_by_dataset
-- Inputs : views `samples` (dataset, sample_id, is_positive, role) and
--          `activations` (layer, dataset, sample_id, feature_id, max_act).
-- Params : $layer   integer  the layer
--          $min_act double   `is_active` when the feature's max_act on the dataset reaches this (seed 1.0)
-- Output : one row per (dataset, feature) with at least one activation row on the dataset, for
--          datasets with at least one positive and one negative sample. Means are SUM / class size of
--          that dataset (inactive samples count as 0), selectivity = (pos_mean - neg_mean) /
--          (pos_mean + neg_mean) as in feature_stats (views/selectivity_by_dataset computes it).
-- Grain  : layer x dataset x feature_id.

with

final as (
    select *
    from selectivity_by_dataset($layer, $min_act)
)

select * from final
order by dataset, feature_id
