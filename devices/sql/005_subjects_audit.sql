-- Who is calling the API: each owner is linked to the subject (`sub`) of the maker's
-- sign-in, one owner per subject; erasure clears the link (a subject may sign up anew).
ALTER TABLE owners ADD COLUMN subject text UNIQUE CHECK (length(subject) BETWEEN 1 AND 255);
ALTER TABLE owners ADD CHECK (status <> 'erased' OR subject IS NULL);

-- What operators did to owners' devices and accounts (revoke, reissue, erase on a
-- request support received): who (the operator's token subject), what (action and
-- target), when, and why (the reason they gave). Written in the action's transaction.
-- Kept after an owner's erasure: the target is then only a random id.
CREATE TABLE audit_log (
    audit_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    actor      text NOT NULL CHECK (actor <> ''),
    action     text NOT NULL CHECK (action IN ('revoke_credentials', 'reissue_credentials',
                                               'erase_owner')),
    target     text NOT NULL,
    reason     text NOT NULL CHECK (reason <> ''),
    at         timestamptz NOT NULL
);

CREATE INDEX audit_log_target ON audit_log (target, at);
