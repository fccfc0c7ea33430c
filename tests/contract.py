"""Facts of the contract that several test modules check against."""

TOOL_KEYS = frozenset({
    "tool_call_id", "tool_name", "tool_args", "tool_call_error", "result", "metrics",
    "child_run_id", "stop_after_tool_call", "created_at", "requires_confirmation", "confirmed",
    "confirmation_note", "requires_user_input", "user_input_schema", "user_feedback_schema",
    "answered", "external_execution_required", "external_execution_silent", "approval_type",
    "approval_id",
})
