"""The atc Textual application: sections (modes), the status line, `:` commands, help, palette.

Sections are Textual *modes*, each with its own screen stack, so drilling down in Browse and
watching Locks keep their places when the operator switches with 1..9. Other parts of atc add a
section by appending one ``Section`` to ``SECTIONS``; the factory is a ``"module:Class"`` string
imported on first use, so start-up never pays for screens (or libraries such as boto3) that the
operator does not open.

Every key the app answers to comes from one table (``APP_ACTIONS`` + ``SECTIONS`` + each screen's
``BINDINGS``): the footer, the ``?`` help screen and the command palette are generated from it, so
they can never disagree. Each binding has an id, so ``App.set_keymap`` can rebind it.
"""

from __future__ import annotations

import importlib
import shlex
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from rich.text import Text
from textual import work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Static

from console.config import Settings
from console.errors import AtcError


@dataclass(frozen=True)
class Section:
    """One top-level section: a mode with its own screen stack, reached with ``key``."""

    mode: str
    key: str
    title: str
    # "package.module:ScreenClass", imported lazily; the class is constructed with no arguments.
    factory: str
    description: str = ""


# The mode registry. Other helpers append here (keys: locks 2, health 3, sizes 4, migrate 5,
# broker 6, audit 7).
SECTIONS: list[Section] = [
    Section(mode="browse", key="1", title="Browse", factory="screens.browse:AssignmentsScreen",
            description="assignments → runs → results → steps → log"),
    Section(mode="locks", key="2", title="Locks", factory="screens.locks:LocksScreen",
            description="who blocks whom, live; cancel or terminate"),
    Section(mode="health", key="3", title="Health", factory="screens.health:HealthScreen",
            description="missing timeouts, waits, deadlocks, connections, big tables"),
    Section(mode="broker", key="6", title="Broker", factory="screens.broker:BrokerScreen",
            description="starving jobs and why; recover via the broker or the DB; runners, jobs, pauses"),
    Section(mode="sizes", key="4", title="Sizes", factory="screens.sizes:SizesScreen",
            description="log bytes: tables, assignments, runs, largest, histogram, threshold"),
    Section(mode="migrate", key="5", title="Migrate", factory="screens.migrate:MigrateScreen",
            description="move large logs to S3: plan, start, pause, cancel, progress"),
    Section(mode="audit", key="7", title="Audit", factory="screens.audit:AuditScreen",
            description="every action: operator, role, reason, outcome"),
]


@dataclass(frozen=True)
class AppAction:
    """An app-wide action: its binding, its palette entry and its help line in one place."""

    id: str
    key: str
    action: str
    description: str
    show: bool = True
    key_display: str | None = None


APP_ACTIONS: list[AppAction] = [
    AppAction("app.help", "question_mark", "help", "Help", key_display="?"),
    AppAction("app.command_line", "colon", "command_line", "Command", key_display=":"),
    AppAction("app.palette", "ctrl+p", "command_palette", "Palette", show=False),
    # q as in htop, k9s, lazygit; text inputs take the letter first, so typing q is safe.
    AppAction("app.quit", "q,ctrl+q", "quit", "Quit", show=False, key_display="q"),
]


def _bindings() -> list[Binding]:
    return [Binding(a.key, a.action, a.description, show=a.show, key_display=a.key_display, id=a.id)
            for a in APP_ACTIONS]


def section_binding(section: Section) -> Binding:
    return Binding(section.key, f"section('{section.mode}')", section.title, show=True, id=f"section.{section.mode}")


def load_factory(spec: str) -> Callable[..., Any]:
    """Import ``"module:Attr"``; errors become one-line AtcErrors."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise AtcError(f"{spec} is not available: {exc}") from None


class UnavailableScreen(Screen):
    """Stands in for a section whose module is not installed or failed to import."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__()
        self.section_title = title
        self.message = message

    def compose(self):
        yield Static(Text(f"{self.section_title}: {self.message}"), id="unavailable")


# -- `:` command mode ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A parsed `:` command line."""

    name: str  # open_assignment | open_run | open_result | open_log | quit | section | help
    arg: Any = None


_ID_COMMANDS = {
    "a": "open_assignment", "assignment": "open_assignment", "runs": "open_assignment",
    "run": "open_run", "results": "open_run", "r": "open_run",
    "result": "open_result", "steps": "open_result",
    "log": "open_log", "l": "open_log", "view": "open_log",
}


def parse_command_line(text: str, sections: list[Section] | None = None) -> Command:
    """Parse what the operator typed after ``:``. Raises AtcError with what to fix."""
    sections = SECTIONS if sections is None else sections
    try:
        words = shlex.split(text.strip().lstrip(":"))
    except ValueError:
        words = text.strip().lstrip(":").split()
    if not words:
        raise AtcError("empty command (try :a ID, :run ID, :result ID, :log ID, :q, or a section name)")
    head, rest = words[0].lower(), words[1:]
    if head in ("q", "quit", "exit", "q!"):
        return Command("quit")
    if head in ("help", "h", "?"):
        return Command("help")
    if head in _ID_COMMANDS:
        if len(rest) != 1 or not rest[0].isdigit():
            raise AtcError(f":{head} needs one numeric id, e.g. :{head} 12")
        return Command(_ID_COMMANDS[head], int(rest[0]))
    for section in sections:
        if head in (section.mode, section.title.lower(), section.key):
            return Command("section", section.mode)
    names = ", ".join(s.mode for s in sections)
    raise AtcError(f"unknown command {head!r} (try :a ID, :run ID, :result ID, :log ID, :q, or one of: {names})")


class CommandLine(ModalScreen[str | None]):
    """The `:` prompt, docked at the bottom like vi's."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel", id="command_line.cancel")]

    def compose(self):
        yield Input(placeholder=":a ID  :run ID  :result ID  :log ID  :q  or a section name", id="command-input")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


# -- the app ---------------------------------------------------------------------------------------


class AtcApp(App[int]):
    """atc's console. Attributes other screens rely on: ``settings``, ``db`` (primary, for actions),
    ``browse_db`` (replica if configured, for lists and logs), ``store`` (S3, created on first use).
    """

    TITLE = "atc"
    SUB_TITLE = "AutoTest operations console"
    CSS_PATH = "app.tcss"
    BINDINGS = _bindings()
    # Filled in __init__ from SECTIONS, so a section appended before the app starts is a mode.
    MODES: ClassVar[dict[str, Any]] = {}

    # ok | stale | reconnecting | connecting — shown in the status line.
    connection_state: reactive[str] = reactive("connecting")
    server_info: reactive[str] = reactive("")

    def __init__(self, settings: Settings, *, open_log: int | None = None, start_mode: str = "browse",
                 ping_interval: float = 10.0) -> None:
        from screens.palette import AtcCommands

        self.COMMANDS = App.COMMANDS | {AtcCommands}
        super().__init__()
        from console.db import Database

        self.settings = settings
        self.db = Database(settings)
        self.browse_db = Database(settings, replica=True) if settings.database.replica_dsn else self.db
        self._store = None
        self.open_log = open_log
        self.start_mode = start_mode
        self.ping_interval = ping_interval
        self._ping_failures = 0
        # Read SECTIONS now (not at import), so the registry as it stands when the app starts wins.
        self.sections = list(SECTIONS)
        for section in self.sections:
            self.add_mode(section.mode, self._section_factory(section))
            self._bindings._add_binding(section_binding(section))
        if settings.ui.theme:
            try:
                self.theme = settings.ui.theme
            except Exception:
                pass

    # -- resources -------------------------------------------------------------------------------

    @property
    def store(self):
        """The S3 bucket; boto3 is imported only when a screen first needs it."""
        if self._store is None:
            from console.storage import ObjectStore

            self._store = ObjectStore(self.settings)
        return self._store

    def _section_factory(self, section: Section) -> Callable[[], Screen]:
        def make() -> Screen:
            try:
                return load_factory(section.factory)()
            except AtcError as exc:
                return UnavailableScreen(section.title, exc.message)

        return make

    def section_for(self, mode: str) -> Section | None:
        return next((s for s in self.sections if s.mode == mode), None)

    # -- lifecycle -------------------------------------------------------------------------------

    def on_mount(self) -> None:
        self.screen_change_signal.subscribe(self, self._decorate_screen)
        self.switch_mode(self.start_mode)
        if self.open_log is not None:
            self.call_after_refresh(self.open_screen, "open_log", self.open_log)
        self.check_connection()

    def on_unmount(self) -> None:
        self.db.close()
        if self.browse_db is not self.db:
            self.browse_db.close()

    def _decorate_screen(self, screen: Screen) -> None:
        """Give every full screen the status line and footer, whoever wrote the screen."""
        from screens.widgets import BottomBar, StatusLine

        if isinstance(screen, ModalScreen) or screen.query(StatusLine):
            return
        if screen.query(Footer):
            status = StatusLine()
            status.styles.dock = "top"
            screen.mount(status)
        else:
            screen.mount(BottomBar(StatusLine(), Footer()))
        # A footer mounted after the screen resumed missed the bindings signal; ask again.
        self.call_after_refresh(screen.refresh_bindings)

    # -- connection state (Dolphie style: the next check is scheduled when this one ends) -------

    @work(thread=True, exclusive=True, group="connection-check", exit_on_error=False)
    def check_connection(self) -> None:
        try:
            info = self.browse_db.ping()
        except AtcError as exc:
            self.call_from_thread(self._connection_failed, exc.message)
            return
        self.call_from_thread(self._connection_ok, info)

    def _connection_ok(self, info: dict[str, Any]) -> None:
        self._ping_failures = 0
        self.connection_state = "ok"
        role = "replica" if info.get("in_recovery") else "primary"
        self.server_info = f"PG {info.get('server_version', '?')} {role}"
        self.set_timer(self.ping_interval, self.check_connection)

    def _connection_failed(self, message: str) -> None:
        self._ping_failures += 1
        self.connection_state = "reconnecting" if self._ping_failures > 1 else "stale"
        if self._ping_failures == 1:
            self.notify(message, severity="error", markup=False)
        self.set_timer(min(30.0, 1.0 * 2 ** min(self._ping_failures, 5)), self.check_connection)

    def note_error(self, exc: BaseException | str) -> None:
        """Show a failure as one plain-text notification; a lost connection marks the data stale."""
        message = exc.message if isinstance(exc, AtcError) else str(exc)
        if "connection lost" in message or "cannot connect" in message:
            if self.connection_state == "ok":
                self.connection_state = "stale"
                self.check_connection()
        self.notify(message, severity="error", markup=False)

    # -- actions ---------------------------------------------------------------------------------

    def action_section(self, mode: str) -> None:
        if mode not in self._modes:
            self.notify(f"no section {mode!r}", severity="error", markup=False)
            return
        self.switch_mode(mode)

    def action_help(self) -> None:
        from screens.help import HelpScreen

        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.screen))

    def action_command_line(self) -> None:
        if isinstance(self.screen, CommandLine):
            return
        self.push_screen(CommandLine(), self.run_command_line)

    def run_command_line(self, text: str | None) -> None:
        if not text or not text.strip():
            return
        try:
            command = parse_command_line(text, self.sections)
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        if command.name == "quit":
            self.exit(0)
        elif command.name == "help":
            self.action_help()
        elif command.name == "section":
            self.action_section(command.arg)
        else:
            self.open_screen(command.name, command.arg)

    def open_screen(self, what: str, ident: int) -> None:
        """Open an assignment / run / result / log by id on top of the Browse stack."""
        factories = {
            "open_assignment": ("screens.browse:RunsScreen", "assignment_id"),
            "open_run": ("screens.browse:ResultsScreen", "run_id"),
            "open_result": ("screens.browse:StepsScreen", "result_id"),
            "open_log": ("screens.log_viewer:LogViewerScreen", "step_result_id"),
        }
        spec, kwarg = factories[what]
        try:
            factory = load_factory(spec)
        except AtcError as exc:
            self.notify(exc.message, severity="error", markup=False)
            return
        if "browse" in self._modes and self.current_mode != "browse":
            self.switch_mode("browse")
        self.push_screen(factory(**{kwarg: ident}))

    # -- one confirm-and-execute path for anything that changes state ----------------------------

    def confirm_and_run(self, title: str, lines: list[str], action: Callable[[str], Any], *,
                        ask_reason: bool = True, on_done: Callable[[Any], None] | None = None,
                        confirm_label: str = "Confirm") -> None:
        """Confirm (listing exactly what is affected), ask a reason, then run ``action(reason)``
        in a thread worker. ``action`` must do its work inside ``console.audit.audited(...)``;
        its result goes to ``on_done`` on the UI thread, failures become error notifications.
        """
        from screens.widgets import ConfirmModal, ReasonModal

        if self.settings.read_only:
            self.notify(f"{title} refused: atc runs read-only", severity="error", markup=False)
            return

        def run(reason: str) -> None:
            self._run_confirmed(title, action, reason, on_done)

        def confirmed(ok: bool | None) -> None:
            if not ok:
                self.notify(f"{title}: cancelled", markup=False)
                return
            if ask_reason:
                self.push_screen(ReasonModal(title, lines=lines),
                                 lambda reason: run(reason) if reason is not None else self.notify(f"{title}: cancelled", markup=False))
            else:
                run("")

        self.push_screen(ConfirmModal(title, lines, confirm_label=confirm_label), confirmed)

    @work(thread=True, group="actions", exit_on_error=False)
    def _run_confirmed(self, title: str, action: Callable[[str], Any], reason: str,
                       on_done: Callable[[Any], None] | None) -> None:
        try:
            result = action(reason)
        except AtcError as exc:
            self.call_from_thread(self.note_error, exc)
            return
        except Exception as exc:  # an unexpected bug must not kill the console mid-incident
            self.call_from_thread(self.note_error, f"{title} failed: {type(exc).__name__}: {exc}")
            return
        if on_done is not None:
            self.call_from_thread(on_done, result)
        else:
            self.call_from_thread(self.notify, f"{title}: done", markup=False)


def run_app(settings: Settings, open_log: int | None = None) -> int:
    """Run the console until the operator quits; returns the process exit code."""
    app = AtcApp(settings, open_log=open_log)
    result = app.run()
    if isinstance(result, int):
        return result
    return app.return_code or 0
