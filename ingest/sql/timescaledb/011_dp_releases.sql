-- Differentially private releases of the planners' reports (`insights.dp_ledger`, the
-- only writer): each release made, kept to be replayed, and each planner's spend.
-- Plain tables, the same as the partitioned layout's 012.
--
-- A release is made once per `release_key` (a SHA-256 of the report, its filters and
-- options, and the privacy parameters: epsilon, delta, bounds, k) and replayed as
-- stored to anyone who asks again: OpenDP draws its noise from the operating system's
-- randomness, so keeping the noisy numbers is what makes a repeat give the same ones
-- (averaging repeats gains nothing) and cost nothing. `body` holds only noisy numbers.
CREATE TABLE {table}_dp_releases (
    release_key text             PRIMARY KEY,
    report      text             NOT NULL,
    parameters  jsonb            NOT NULL,
    epsilon     double precision NOT NULL CHECK (epsilon > 0),
    delta       double precision NOT NULL CHECK (delta >= 0),
    planner     text             NOT NULL,
    released_at timestamptz      NOT NULL DEFAULT now(),
    body        jsonb            NOT NULL
);

-- The budget ledger: one row per new release, charged to the planner (the token's
-- subject, or `cli:<user>` for `usagepipe report --dp`) whose request made it. A
-- planner's spend is the sum of their rows; nothing here is ever updated or deleted.
CREATE TABLE {table}_dp_spend (
    planner     text             NOT NULL,
    release_key text             NOT NULL REFERENCES {table}_dp_releases (release_key),
    epsilon     double precision NOT NULL CHECK (epsilon > 0),
    delta       double precision NOT NULL CHECK (delta >= 0),
    spent_at    timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (planner, release_key)
);
