-- samples: the labelled samples probes are trained and evaluated on, in a fixed order.
--
-- Inputs : view `samples` (dataset, sample_id, label, is_positive, role, group, text).
-- Params : none.
-- Output : every sample with its raw label, 0/1 class, its dataset's role, its group (generator / source:
--          the unit that leave-one-group-out holds out; null in lakes written before groups existed, read
--          as the dataset) and its text (near-duplicate detection for group-aware folds), ordered by dataset
--          then sample_id (the row order of every design matrix built from it).
-- Grain  : dataset x sample_id.

with

final as (
    select
        dataset,
        sample_id,
        label,
        is_positive,
        role,
        coalesce("group", dataset) as "group",
        text
    from samples
)

select * from final
order by dataset, sample_id
