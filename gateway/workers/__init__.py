"""Several worker processes on one listen port that behave as one gateway.

    role.py        WorkerRole: which worker a process is and where its parent's hub listens
    report.py      WorkerReport: what a worker ships to the parent every `server.workers_report_s`
    merge.py       adding reports up: counters and histograms add, gauges sum (or the least healthy)
    link.py        WorkerLink (in each worker): ships reports and drift rows, asks the hub for the
                   merged ModelStatistics counts, snapshot and drift answers
    hub.py         Hub (in the parent): receives reports on a local socket; owns the Prometheus
                   endpoint, the OTLP metric stream, the drift windows and alerts
    supervisor.py  Supervisor (the parent): reserves the port, starts N workers, restarts a dead
                   one, forwards SIGTERM and SIGHUP and waits for the workers to finish
"""
