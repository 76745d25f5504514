"""The Claude Code CLI backend: :class:`ClaudeCLIDescriber` runs ``claude -p`` with
``asyncio.create_subprocess_exec`` (never a shell); the prompt goes on stdin, never on the command line."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dagster_project.lib.describers.errors import EmptyReplyError, LLMCallError, LLMConfigError
from dagster_project.lib.describers.interface import Describer, PerLoop
from dagster_project.lib.describers.types import LLMRequest, LLMResponse


class ClaudeCLIDescriber(Describer):
    """``claude -p --model M`` as a subprocess: argv list (no shell), prompt on stdin.

    The system instructions go in ``--system-prompt`` (they are fixed text from this repository);
    all trace-derived text goes on stdin. ``--tools ""`` gives the model no tools at all. With
    ``output_format="json"`` the CLI's result envelope supplies usage and cost.
    """

    backend = "claude-cli"

    def __init__(
        self,
        *,
        model: str = "sonnet",
        executable: str = "claude",
        timeout_s: float = 300.0,
        max_concurrency: int = 2,
        output_format: str = "json",
        extra_args: Sequence[str] = ("--tools", ""),
        env: Mapping[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        if output_format not in ("json", "text"):
            raise ValueError(f"output_format must be 'json' or 'text', got {output_format!r}")
        self.model = model
        self.executable = executable
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.output_format = output_format
        self.extra_args = tuple(extra_args)
        self._env = dict(env) if env is not None else None
        self.__api_key = api_key
        self._per_loop = PerLoop()

    def __repr__(self) -> str:
        return f"ClaudeCLIDescriber(model={self.model!r}, executable={self.executable!r})"

    def key_params(self) -> dict[str, Any]:
        return {"extra_args": list(self.extra_args), "output_format": self.output_format}

    def argv(self, request: LLMRequest) -> list[str]:
        return [
            self.executable,
            "-p",
            "--model",
            self.model,
            "--output-format",
            self.output_format,
            "--system-prompt",
            request.system,
            *self.extra_args,
        ]

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ if self._env is None else self._env)
        if self.__api_key:
            env["ANTHROPIC_API_KEY"] = self.__api_key
        return env

    async def complete(self, request: LLMRequest) -> LLMResponse:
        sem = self._per_loop.get("semaphore", lambda: asyncio.Semaphore(self.max_concurrency))
        async with sem:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self.argv(request),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=self._child_env(),
                )
            except (FileNotFoundError, PermissionError) as e:
                raise LLMConfigError(f"cannot run the claude CLI {self.executable!r}: {e}") from e
            try:
                stdout, stderr = await asyncio.wait_for(
                    proc.communicate(request.user.encode("utf-8")), timeout=self.timeout_s
                )
            except TimeoutError as e:
                proc.kill()
                await proc.wait()
                raise LLMCallError(f"claude CLI timed out after {self.timeout_s}s", retryable=True) from e
        if proc.returncode != 0:
            tail = stderr.decode("utf-8", "replace").strip()[-300:]
            raise LLMCallError(f"claude CLI exited {proc.returncode}: {tail}", retryable=True)
        out = stdout.decode("utf-8", "replace")
        if self.output_format == "text":
            if not out.strip():
                raise EmptyReplyError("claude CLI printed nothing")
            return LLMResponse(text=out, model=self.model, backend=self.backend)
        return self._parse_envelope(out)

    def _parse_envelope(self, out: str) -> LLMResponse:
        try:
            env = json.loads(out)
        except json.JSONDecodeError as e:
            raise LLMCallError(f"claude CLI output is not its JSON envelope: {out[:200]!r}") from e
        if not isinstance(env, dict):
            raise LLMCallError("claude CLI JSON envelope is not an object")
        if env.get("is_error") or env.get("subtype", "success") != "success":
            raise LLMCallError(
                f"claude CLI reported an error: {str(env.get('result') or env.get('subtype'))[:300]}"
            )
        text = env.get("result")
        usage = env.get("usage") or {}
        model_usage = env.get("modelUsage") or {}
        model = next(iter(model_usage), self.model) if isinstance(model_usage, dict) else self.model
        cost = env.get("total_cost_usd")
        resp = LLMResponse(
            text=text if isinstance(text, str) else "",
            model=str(model),
            backend=self.backend,
            input_tokens=int(usage.get("input_tokens", 0) or 0),
            output_tokens=int(usage.get("output_tokens", 0) or 0),
            cache_creation_input_tokens=int(usage.get("cache_creation_input_tokens", 0) or 0),
            cache_read_input_tokens=int(usage.get("cache_read_input_tokens", 0) or 0),
            cost_usd=float(cost) if isinstance(cost, int | float) else None,
        )
        if not resp.text.strip():
            raise EmptyReplyError("claude CLI returned an empty result", response=resp)
        return resp

