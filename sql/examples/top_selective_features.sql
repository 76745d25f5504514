-- top_selective_features: which features separate the classes best at a layer, and how often does
-- each fire on every dataset (train, test and ood), per class?
--
-- Uses   : views/firing_rates
-- Inputs : views `feature_stats`, `activations`, `samples`.
-- Params : $layer integer, $limit integer (how many features, e.g. 20)
-- Output : one row per (top feature, dataset): the feature's rank by |selectivity| among active
--          features, its training selectivity and means, and on the dataset firing_rate (fraction of
--          samples with the feature active), firing_rate_pos / firing_rate_neg (NULL when the dataset
--          has no sample of that class).
-- Grain  : feature_id x dataset.

with

top_features as (
    select
        feature_id,
        selectivity,
        pos_mean,
        neg_mean,
        row_number() over (order by abs(selectivity) desc, feature_id) as rank
    from feature_stats
    where layer = $layer
        and is_active
        and selectivity is not null
    qualify rank <= $limit
),

final as (
    select
        top_features.rank,
        top_features.feature_id,
        top_features.selectivity,
        top_features.pos_mean,
        top_features.neg_mean,
        firing.dataset,
        firing.role,
        firing.firing_rate,
        firing.firing_rate_pos,
        firing.firing_rate_neg
    from top_features
    inner join firing_rates('top_features', $layer, false) as firing
        on top_features.feature_id = firing.feature_id
)

select * from final
order by rank, dataset
