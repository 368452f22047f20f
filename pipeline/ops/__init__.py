"""Operations: the cron wrapper, the run audit, alerts, status, the report and the CLI."""
