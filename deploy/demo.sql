-- Demo table for Herald (idempotent: safe to apply any number of times).
-- Used by docker-compose (docker-entrypoint-initdb.d) and scripts/dev.sh.
-- The matching [[tables]] entry is in deploy/herald.toml.

CREATE TABLE IF NOT EXISTS public.res_users (
    id           bigserial PRIMARY KEY,
    tenant_id    text        NOT NULL DEFAULT 'demo',
    team_id      bigint,
    website_slug text UNIQUE,
    callsign     text,
    name         text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Seed rows carry fixed ids, so re-applying never duplicates them even after
-- scripts/dev.sh has renamed their slugs (any unique conflict skips the row).
INSERT INTO public.res_users (id, tenant_id, team_id, website_slug, callsign, name)
VALUES
    (1, 'demo', 1, 'alice', 'ALPHA',   'Alice Liddell'),
    (2, 'demo', 1, 'bob',   'BRAVO',   'Bob Builder'),
    (3, 'demo', 2, 'carol', 'CHARLIE', 'Carol Danvers')
ON CONFLICT DO NOTHING;

-- Keep the id sequence ahead of the fixed ids above.
SELECT setval(pg_get_serial_sequence('public.res_users', 'id'),
              GREATEST((SELECT max(id) FROM public.res_users), 1));
