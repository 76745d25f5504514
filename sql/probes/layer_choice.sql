-- layer_choice: the recommended probe of every layer side by side, so the layer is chosen like the probe.
--
-- Inputs : view `probes` (layer, probe_id, kind, is_best, selection, selection_score, lodo_worst_auroc,
--          lodo_mean_auroc, cv_auroc, n_nonzero).
-- Params : none.
-- Output : one row per (kind, layer) with the layer's best probe of that kind, ranked within the kind by
--          selection score (held-out-group AUROC under `lodo`, training CV under `cv`); `layer_rank` 1 is
--          the layer the tool recommends for that kind. Scores of layers selected differently are not
--          comparable: compare `selection` first.
-- Grain  : kind x layer.

with

best as (
    select
        kind,
        layer,
        probe_id,
        selection,
        selection_score,
        lodo_worst_auroc,
        lodo_mean_auroc,
        cv_auroc,
        n_nonzero
    from probes
    where is_best
),

final as (
    select
        *,
        rank() over (partition by kind, selection order by selection_score desc nulls last, layer) as layer_rank
    from best
)

select * from final
order by kind desc, selection, layer_rank, layer
