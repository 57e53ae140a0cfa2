"""The reference for request throughput: a bare workflow of the same shape as a signing request
(start, one update whose handler runs one activity, complete), with nothing else in it.

Kept in its own module, importing only temporalio, so the workflow sandbox can re-import it.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow


@activity.defn(name="bench_bare_activity")
async def bare_activity(request_id: str) -> str:
    return request_id


@workflow.defn(name="BenchBareWorkflow")
class BareWorkflow:
    def __init__(self) -> None:
        self.approved = False

    @workflow.run
    async def run(self, request_id: str) -> str:
        await workflow.wait_condition(lambda: self.approved)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return request_id

    @workflow.update
    async def approve(self, request_id: str) -> str:
        result: str = await workflow.execute_activity(
            bare_activity, request_id, start_to_close_timeout=timedelta(seconds=30)
        )
        self.approved = True
        return result
