-- classification_scores: the 0-10 relevance score of each classified feature of a layer.
--
-- Inputs : view `classifications` (layer, feature_id, score, status).
-- Params : $layer integer.
-- Output : features whose classification succeeded (status 'ok') with a score; the probes asset keeps
--          those with score >= the configured relevant_threshold as the `relevant` feature set.
-- Grain  : feature_id.

with

final as (
    select
        feature_id,
        score
    from classifications
    where layer = $layer
        and status = 'ok'
        and score is not null
)

select * from final
order by feature_id
