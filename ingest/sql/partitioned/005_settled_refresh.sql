-- The consumers' periodic refresh materialises only buckets that have ended, as a
-- TimescaleDB refresh policy's end_offset does: recomputing the open hour and day
-- every minute would cost a whole day's rows each time. Reads stay exact meanwhile
-- (noted buckets are read from the raw rows). A note whose hour has been materialised
-- but whose day is still open stays, marked, until its day is.
ALTER TABLE {table}_rollup_invalidations
    ADD COLUMN hourly_done boolean NOT NULL DEFAULT false;
