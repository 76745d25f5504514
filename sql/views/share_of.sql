-- views/share_of: a count or sum over the samples of a group, as a share of the group's size.
--
-- Inputs : none (a scalar macro).
-- Output : scalar macro share_of(share_part, share_whole) = coalesce(share_part, 0) / share_whole, NULL
--          when the group is empty: a feature with no activation rows in a group fired on none of it
--          (inactive features have no rows), and a dataset without a class has no rate for that class.
-- Grain  : one value.

create or replace temp macro share_of(share_part, share_whole) as coalesce(share_part, 0) / nullif(share_whole, 0)
