-- views/class_sizes: how many samples, and of each class, every dataset holds.
--
-- Inputs : view `samples` (dataset, sample_id, is_positive, role).
-- Output : temp view class_sizes: dataset, role, n_samples, n_pos (positive samples), n_neg (negative ones).
--          Means over samples divide by these (inactive features have no activation rows).
-- Grain  : dataset.

create or replace temp view class_sizes as
select
    dataset,
    any_value(role) as role,
    count(*) as n_samples,
    count(*) filter (where is_positive) as n_pos,
    count(*) filter (where not is_positive) as n_neg
from samples
group by dataset
