-- notebook/probe_scores: the per-sample scores of one saved probe, with each sample's label and role.
--
-- Inputs : views `probe_scores` (layer, probe, kind, dataset, sample_id, score: the best SAE probe and the
--          best dense baseline of each layer, on every dataset they can score) and `samples`.
-- Params : $probe   varchar          the probe id (`probes.probe_id`, `probe_metrics.probe`)
--          $layer   integer or NULL  its layer; NULL = every layer that has it
--          $dataset varchar or NULL  one dataset; NULL = all
-- Output : layer, probe, kind, dataset, role, sample_id, label, is_positive, score (the probe's decision
--          function; higher = more positive), ordered by layer, dataset, sample_id.
-- Grain  : layer x dataset x sample_id.

with

scores as (
    select
        layer,
        probe,
        kind,
        dataset,
        sample_id,
        score
    from probe_scores
    where probe = $probe
        and ($layer is null or layer = $layer)
        and ($dataset is null or dataset = $dataset)
),

final as (
    select
        scores.layer,
        scores.probe,
        scores.kind,
        scores.dataset,
        samples.role,
        scores.sample_id,
        samples.label,
        samples.is_positive,
        scores.score
    from scores
    left join samples
        using (dataset, sample_id)
)

select * from final
order by layer, dataset, sample_id
