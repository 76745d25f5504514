-- selected_features: the class-selective features of one layer worth describing and probing.
--
-- Inputs : view `feature_stats` (the output of stats/feature_stats.sql, any number of layers).
-- Params : $layer           integer  the layer
--          $min_selectivity double   keep |selectivity| >= this (seed 0.3)
--          $min_freq        double   keep features firing on at least this fraction of the samples of
--                                    the class they prefer (0 keeps all)
--          $keep_negative   boolean  false keeps only features that prefer the positive class
--          $max_features    integer or NULL  keep the first N by rank; NULL keeps all
--          $fdr_alpha       double or NULL   keep only features with q_value < this (the Benjamini-Hochberg
--                                    q of the Mann-Whitney test in feature_stats); NULL: no such filter
-- Output : features with is_active and |selectivity| >= $min_selectivity, ranked by |selectivity| desc,
--          then the frequency in the preferred class desc, then feature_id; direction is 'positive'
--          (fires more on positives) or 'negative'; `reason` says in words why it was kept (with the
--          rank test's p and q when feature_stats has them). p_value / q_value are feature_stats'.
-- Grain  : layer x feature_id.

with

layer_stats as (
    select *
    from feature_stats
    where layer = $layer
),

candidates as (
    select
        layer,
        feature_id,
        case when selectivity >= 0 then 'positive' else 'negative' end as direction,
        selectivity,
        abs(selectivity) as abs_selectivity,
        case when selectivity >= 0 then pos_freq else neg_freq end as freq,
        pos_mean,
        neg_mean,
        pos_freq,
        neg_freq,
        max_act,
        selectivity_mean_act,
        p_value,
        q_value
    from layer_stats
    where is_active
        and abs(selectivity) >= $min_selectivity
),

filtered as (
    select *
    from candidates
    where freq >= $min_freq
        and (direction = 'positive' or $keep_negative)
        and ($fdr_alpha is null or q_value < $fdr_alpha)
),

ranked as (
    select
        *,
        row_number() over (order by abs_selectivity desc, freq desc, feature_id) as rank
    from filtered
),

final as (
    select
        layer,
        feature_id,
        rank,
        * exclude (layer, feature_id, rank),  -- direction, selectivity, ... q_value: the candidates' columns
        printf(
            'selectivity %+.3f (|s| >= %.2f): mean max_act %.3f on positives vs %.3f on negatives; '
            || 'fires on %.1f%% of positive and %.1f%% of negative training samples (peak %.2f)',
            selectivity, $min_selectivity, pos_mean, neg_mean, 100 * pos_freq, 100 * neg_freq, max_act
        ) || case
            when q_value is null then ''
            else printf('; Mann-Whitney p %.2g, BH q %.2g', p_value, q_value)
                || case when $fdr_alpha is null then '' else printf(' < %g', $fdr_alpha) end
        end as reason
    from ranked
    where $max_features is null or rank <= $max_features
)

select * from final
order by rank
