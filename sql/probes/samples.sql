-- samples: the labelled samples probes are trained and evaluated on, in a fixed order.
--
-- Inputs : view `samples` (dataset, sample_id, label, is_positive, role).
-- Params : none.
-- Output : every sample with its raw label, 0/1 class and its dataset's role, ordered by dataset then
--          sample_id (the row order of every design matrix built from it).
-- Grain  : dataset x sample_id.

with

final as (
    select
        dataset,
        sample_id,
        label,
        is_positive,
        role
    from samples
)

select * from final
order by dataset, sample_id
