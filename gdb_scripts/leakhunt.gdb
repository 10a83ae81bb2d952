# leakhunt.gdb: the settings of every leakhunt gdb session, sent line by line before `attach`.
#
# leakhunt's gdb backend (leakhunt/gdb/session.py) sends each line below as a CLI command and
# carries on when one fails (an older gdb, cuda-gdb, a gdb without Python), except for the
# lines it checks afterwards (non-stop, mi-async).  Usage by hand, to reproduce a session:
#
#     gdb -x gdb_scripts/leakhunt.gdb -ex 'attach PID &' -ex 'break *ADDR if $rdi == 9'
#
# Non-stop: only the thread that hit a breakpoint stops; every other thread of the server keeps
# serving (in all-stop mode every hit would freeze all threads for the whole round trip).
set non-stop on
set mi-async on
set pagination off
set confirm off
set width 0
set height 0
set print thread-events off
set print inferior-events off
set breakpoint pending off
# Attach without reading the libraries' symbols: gdb reads them while one thread of the target
# is stopped (seconds for a torch server). leakhunt runs `sharedlibrary` once every thread runs
# again, then sets auto-solib-add back on for libraries loaded later.
set auto-solib-add off
# Never fetch debug info over the network while the target waits.
set debuginfod enabled off
# Run nothing that ships beside the target's objects: it may be a container we do not trust.
set auto-load python-scripts off
set auto-load gdb-scripts off
set auto-load local-gdbinit off
# Signals go straight to the target: a stop on SIGALRM/SIGCHLD/SIGUSR1... would hold a thread.
handle all nostop noprint pass
handle SIGINT nostop noprint pass
# After an exec our breakpoint addresses mean nothing: with a new inferior for the new program,
# gdb says so in MI (=thread-group-started) and leakhunt deletes them and detaches.
set follow-exec-mode new
catch exec
set backtrace limit 256
# Each stop, gdb would describe the frame for the console (arguments read from debug info, the
# source line looked up on disk) while the target thread waits: leakhunt reads none of it.
set print frame-arguments none
set print frame-info short-location
set source open off
