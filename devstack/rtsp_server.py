"""A GStreamer RTSP server for tests and the demo. Run with Debian's /usr/bin/python3.

Usage: rtsp_server.py --port P [--fps 15] [--size 320x240] [--gop MOUNT=FRAMES]
                      [--sdp-only MOUNT] MOUNT=[CLIP] ...
A mount with a clip serves that pre-encoded H.264 MP4 in a loop (no live encoding);
a mount without one serves a live test pattern encoded with x264, a keyframe every
``--gop`` frames (default: one a second). ``--sdp-only``: that live mount sends its
parameter sets only in the SDP (sprop-parameter-sets), never in-band, as some
cameras do.
"""

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def launch_line(clip, fps, width, height, gop=None, sdp_only=False):
    if clip:
        # multifilesrc loops the file; qtdemux re-reads it each pass.
        return (
            f"( multifilesrc location={clip} loop=true ! qtdemux ! h264parse "
            f"! rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
    # SDP only: x264 writes no headers in-band (repeat-headers=0; they go to codec_data,
    # which the payloader turns into sprop-parameter-sets) and the payloader repeats none.
    extra = 'option-string="repeat-headers=0" ' if sdp_only else ""
    return (
        f"( videotestsrc is-live=true pattern=ball background-color=0xff7f6f5f "
        f"! video/x-raw,width={width},"
        f"height={height},framerate={fps}/1 ! x264enc tune=zerolatency "
        f"speed-preset=ultrafast key-int-max={gop or fps} {extra}! rtph264pay name=pay0 "
        f"pt=96 config-interval={0 if sdp_only else 1} )"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--gop", action="append", default=[])
    parser.add_argument("--sdp-only", action="append", default=[])
    parser.add_argument("mounts", nargs="+")
    args = parser.parse_args()
    gops = dict((m, int(n)) for m, _, n in (g.partition("=") for g in args.gop))
    width, height = (int(v) for v in args.size.split("x"))
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    points = server.get_mount_points()
    for spec in args.mounts:
        mount, _, clip = spec.partition("=")
        factory = GstRtspServer.RTSPMediaFactory()
        line = launch_line(clip, args.fps, width, height, gops.get(mount), mount in args.sdp_only)
        factory.set_launch(line)
        factory.set_shared(True)
        points.add_factory("/" + mount, factory)
    server.attach(None)
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print("READY", flush=True)
    sys.stdout.flush()
    loop.run()


if __name__ == "__main__":
    main()
