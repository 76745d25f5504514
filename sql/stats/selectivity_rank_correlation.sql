-- selectivity_rank_correlation: do datasets agree on which features prefer the positive class?
-- Spearman rank correlation of per-dataset selectivity between every pair of datasets that have both
-- classes, over the features active (max_act >= $min_act) on both.
--
-- Uses   : views/selectivity_by_dataset
-- Inputs : views `samples` (dataset, sample_id, is_positive) and
--          `activations` (layer, dataset, sample_id, feature_id, max_act).
-- Params : $layer   integer  the layer
--          $min_act double   a feature takes part for a dataset when its max_act there reaches this
-- Output : one row per unordered pair (dataset_a < dataset_b) sharing at least one active feature:
--          n_features (active on both),
--          spearman (Pearson correlation of average ranks, so ties are handled as scipy's spearmanr does)
--          and pearson (on the raw selectivities); both NULL when undefined (fewer than 2 features or a
--          constant side). Selectivity per dataset is stats/dataset_selectivity's (views/selectivity_by_dataset).
-- Grain  : layer x dataset_a x dataset_b.

with

selectivity as (
    select
        dataset,
        feature_id,
        selectivity
    from selectivity_by_dataset($layer, $min_act)
    where is_active
),

paired as (
    select
        sel_a.dataset as dataset_a,
        sel_b.dataset as dataset_b,
        sel_a.feature_id,
        sel_a.selectivity as selectivity_a,
        sel_b.selectivity as selectivity_b
    from selectivity as sel_a
    inner join selectivity as sel_b
        on sel_a.feature_id = sel_b.feature_id
        and sel_a.dataset < sel_b.dataset
),

ranked as (
    select
        dataset_a,
        dataset_b,
        selectivity_a,
        selectivity_b,
        -- average rank of ties: first rank of the tie group + (tie group size - 1) / 2
        rank() over (partition by dataset_a, dataset_b order by selectivity_a)
            + (count(*) over (partition by dataset_a, dataset_b, selectivity_a) - 1) / 2
            as rank_a,
        rank() over (partition by dataset_a, dataset_b order by selectivity_b)
            + (count(*) over (partition by dataset_a, dataset_b, selectivity_b) - 1) / 2
            as rank_b
    from paired
),

correlations as (
    select
        dataset_a,
        dataset_b,
        count(*) as n_features,
        corr(rank_a, rank_b) as spearman,
        corr(selectivity_a, selectivity_b) as pearson
    from ranked
    group by dataset_a, dataset_b
),

final as (
    select
        cast($layer as integer) as layer,
        dataset_a,
        dataset_b,
        n_features,
        case when n_features < 2 or isnan(spearman) then null else spearman end as spearman,
        case when n_features < 2 or isnan(pearson) then null else pearson end as pearson
    from correlations
)

select * from final
order by dataset_a, dataset_b
