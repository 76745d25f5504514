-- train_classes: asset check input; the training datasets and how many samples of each class they hold.
--
-- Uses   : views/class_sizes
-- Inputs : view `samples` (dataset, sample_id, is_positive, role).
-- Params : $train_datasets varchar[] or NULL  the configured list; NULL = every dataset whose role is 'train'
-- Output : one row per training dataset (a configured name missing from `samples` appears with
--          n_samples = 0 and in_samples = false). The check fails when the pooled n_positive or
--          n_negative is 0, or a configured dataset is missing, naming the datasets.
-- Grain  : dataset.

with

configured as (
    select unnest($train_datasets::varchar[]) as dataset
),

by_role as (
    select distinct dataset
    from samples
    where $train_datasets is null
        and role = 'train'
),

train_datasets as (
    select dataset from configured
    union
    select dataset from by_role
),

counts as (
    select
        class_sizes.dataset,
        class_sizes.role,
        class_sizes.n_samples,
        class_sizes.n_pos as n_positive,
        class_sizes.n_neg as n_negative
    from class_sizes
    semi join train_datasets
        on class_sizes.dataset = train_datasets.dataset
),

final as (
    select
        train_datasets.dataset,
        counts.role,
        coalesce(counts.n_samples, 0) as n_samples,
        coalesce(counts.n_positive, 0) as n_positive,
        coalesce(counts.n_negative, 0) as n_negative,
        counts.dataset is not null as in_samples
    from train_datasets
    left join counts
        on train_datasets.dataset = counts.dataset
)

select * from final
order by dataset
